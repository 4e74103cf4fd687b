"""Training-data extraction, Carlini et al. 2023 ("Extracting Training Data from Diffusion Models",
USENIX Security), with held-out controls so that its answer means something.

Design. *Units* are probed, not captions: ``units`` member units and as many held-out units, one record
each, drawn uniformly at random within each side (a stratified draw; ``draw_units``). The member /
held-out split is itself uniformly random with a fixed count, so the draw is exchangeable: given the
probed set, every balanced assignment of it is equally likely, which is what the one-run analysis of a
fixed-count split needs. (Ranking some units first, e.g. duplicates, by walking a list until each side is
full would break this: the minority side would be drawn from a longer prefix.) ``per_caption`` images are
generated for each distinct caption of the probed units, at the training resolution, and an item's scores
say how close the generations of its own caption come to it:

* ``l2``: minus the smallest RMS pixel distance (Carlini's L2, the minimum over a horizontal flip);
* ``tiled_l2``: minus the smallest tiled L2 (Carlini's distance for large images: every tile must match);
* ``clique``: the largest clique of the caption's generations (tiled L2 within ``clique_threshold`` of each
  other) all within ``clique_threshold`` of the item: Carlini et al.'s memorisation signal, tied to an item;
* ``feature`` (optional): cosine similarity from a local copy-detection model (SSCD, Pizzi et al. 2022).

Verdict. Every detector's scores go through the one-run analysis (``dpdiff.probes.audit.one_run_audit``,
``fixed_count=True``), Bonferroni over the detectors; ``dpdiff.probes.verdict`` turns the largest bound, its
ceiling and the test's power into PASS / FAIL / INCONCLUSIVE. Without controls the ceiling is 0, not
None. For a run without DP the question is whether anything leaks at all, and the one-run analysis,
built for epsilon > 0, pays a large correction for the fixed count; there the exact test of "no leak" is
the permutation (hypergeometric) test of the matches (``leak_p_value``): under no leak, which of the
probed units were training units is independent of the model, so every assignment of the matches is
equally likely. 8 training images extracted and no held-out match among 16 + 16 units is p = 0.0012.

Calibration and blockers, as before: the threshold in use is ``min(l2_threshold, q-quantile of held-out
images' nearest-training distance)``; the base VAE's reconstruction distance of probed training images is
the floor no generation can go below (floor above threshold: INCONCLUSIVE).

Memory. Distances are computed at ``match_resolution`` (default 64 px, area-downsampled; at most the
training resolution), and the nearest-training-image searches (the threshold's calibration on up to
``calibration_heldout`` held-out images, and every generation's nearest training image) stream the training
images in batches of ``batch_images``: memory is bounded by the batch and the queries, not by N (today's
design held every training image at training resolution: 31 GB for 10k images at 512 px).

Followed: LeakPro's carlini extraction (tiled L2, cliques); Somepalli et al. 2023 for SSCD.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from dpdiff.probes.cliques import largest_clique
from dpdiff.probes.context import ProbeContext, pil_to_float
from dpdiff.probes.metrics import cross_l2, cross_tiled_l2, pairwise_tiled_l2, phash_distance, ssim, tiled_l2
from dpdiff.schema import required


def expected_distinct_captions(captions: list[str], draws: int) -> float:
    """Expected number of distinct captions among ``draws`` units drawn uniformly without replacement from
    units with these ``captions``: ``sum_c 1 - C(N - n_c, draws) / C(N, draws)``. Label-blind (every unit)."""
    from collections import Counter

    n = len(captions)
    draws = min(int(draws), n)
    if draws <= 0:
        return 0.0
    lg = math.lgamma

    def log_comb(a: int, b: int) -> float:
        return lg(a + 1) - lg(b + 1) - lg(a - b + 1)

    total = 0.0
    for n_c in Counter(captions).values():
        total += 1.0 if n - n_c < draws else 1.0 - math.exp(log_comb(n - n_c, draws) - log_comb(n, draws))
    return total


def draw_units(members: list[int], held: list[int], *, units: int, seed: int) -> tuple[list[int], list[int]]:
    """``min(units, len(members), len(held))`` of each side, uniformly at random (seeded), sorted. Exchangeable
    (module docstring): the one-run analysis of the probed split stays valid."""
    n = min(int(units), len(members), len(held))
    rng = np.random.default_rng([int(seed), 0xE7])
    mem = sorted(rng.choice(members, size=n, replace=False).tolist()) if n else []
    hold = sorted(rng.choice(held, size=n, replace=False).tolist()) if n else []
    return mem, hold


def units_for_budget(ctx: ProbeContext, pool: list[int], *, units: int, max_captions: int | None) -> int:
    """The largest number of units per side (at most ``units``) whose expected distinct captions fit
    ``max_captions`` (generation budget / per_caption), computed over every probed-eligible unit (label-blind)."""
    if not max_captions:
        return int(units)
    caps = [ctx.records[i].text for i in pool]
    k = int(units)
    while k > 1 and expected_distinct_captions(caps, 2 * k) > max_captions:
        k -= 1
    return k


def _area_resize(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape[1] == size and arr.shape[2] == size:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return torch.nn.functional.interpolate(t, size=(size, size), mode="area").permute(0, 2, 3, 1).numpy()


def _load_images(ctx: ProbeContext, ids: list[int], size: int | None = None) -> np.ndarray:
    """Images of ``ids`` as float [0, 1] at the training resolution, area-downsampled to ``size``."""
    from dpdiff.data.preprocess import from_pixels, to_pixels

    arr = pil_to_float([from_pixels(to_pixels(ctx.records[i].open(), resolution=ctx.resolution)) for i in ids])
    return _area_resize(arr, size) if size else arr


def _min_over_flips(fn, gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.minimum(fn(gen, ref), fn(gen, ref[:, :, ::-1]))


def nearest_training(ctx: ProbeContext, queries: np.ndarray, train_ids: list[int], *, size: int,
                     batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For every query image (already at ``size``): the smallest RMS distance (min over a flip) to a training
    image and that image's record id, streaming the training images in batches of ``batch`` (memory bounded by
    the batch, not by N)."""
    best = np.full(len(queries), np.inf)
    arg = np.full(len(queries), -1, dtype=np.int64)
    if len(queries) == 0:
        return best, arg
    for s in range(0, len(train_ids), batch):
        ids = train_ids[s : s + batch]
        d = _min_over_flips(cross_l2, queries, _load_images(ctx, ids, size))
        j = d.argmin(1)
        dj = d[np.arange(len(queries)), j]
        better = dj < best
        best[better] = dj[better]
        arg[better] = np.asarray(ids)[j[better]]
    return best, arg


@torch.no_grad()
def vae_floor(ctx: ProbeContext, ids: list[int], *, size: int | None = None, batch_size: int = 16) -> np.ndarray:
    """RMS pixel distance between each image and the base VAE's reconstruction of it (posterior mean),
    on [0, 1] pixels at the training resolution, area-downsampled to ``size`` (the matching resolution): the
    closest any generation can come to it."""
    from dpdiff.data.preprocess import to_pixels

    vae = ctx.base.vae
    out = []
    for s in range(0, len(ids), batch_size):
        px = torch.stack([to_pixels(ctx.records[i].open(), resolution=ctx.resolution)
                          for i in ids[s : s + batch_size]]).to(ctx.device, vae.dtype)
        rec = vae.decode(vae.encode(px).latent_dist.mean, return_dict=False)[0]
        a = (px.float().clamp(-1, 1) + 1) / 2
        b = (rec.float().clamp(-1, 1) + 1) / 2
        if size and size != a.shape[-1]:
            a = torch.nn.functional.interpolate(a, size=(size, size), mode="area")
            b = torch.nn.functional.interpolate(b, size=(size, size), mode="area")
        # the 8-bit rounding of a real generation is below 1/510 per pixel: negligible here
        out.append((a - b).pow(2).flatten(1).mean(1).sqrt().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def feature_similarity(path: str | None, gen: np.ndarray, ref: np.ndarray, device, *,
                       batch_size: int = 64) -> np.ndarray | None:
    """Cosine similarity ``[len(gen), len(ref)]`` from a local torchscript feature extractor (e.g. SSCD,
    224 x 224 ImageNet-normalised input), embedded in batches of ``batch_size``; nothing is downloaded."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        from dpdiff.errors import UserError

        raise UserError(f"probes.extraction.feature_extractor={path} does not exist (a local torchscript file)")
    model = torch.jit.load(str(p), map_location=device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def emb(x: np.ndarray) -> torch.Tensor:
        parts = []
        for s in range(0, len(x), batch_size):
            t = torch.from_numpy(np.ascontiguousarray(x[s : s + batch_size])).permute(0, 3, 1, 2).float().to(device)
            t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False)
            parts.append(torch.nn.functional.normalize(model((t - mean) / std).float(), dim=-1).cpu())
        return torch.cat(parts)

    return (emb(gen) @ emb(ref).T).numpy()


def calibrated_threshold(*, l2_threshold: float, heldout_nearest: np.ndarray | None,
                         max_false_match_rate: float) -> float:
    """``min(l2_threshold, the max_false_match_rate-quantile of held-out nearest-training distances)``,
    lowered just below that quantile so at most that share of held-out images match (``<=``)."""
    thr = float(l2_threshold)
    if heldout_nearest is None or len(heldout_nearest) == 0:
        return thr
    d = np.sort(np.asarray(heldout_nearest, dtype=np.float64))
    allowed = int(np.floor(max_false_match_rate * len(d) + 1e-9))  # held-out images allowed to match
    if allowed >= len(d):
        return thr
    return float(min(thr, np.nextafter(d[allowed], -np.inf)))


def clique_size_threshold(control_cliques: list[int], *, minimum: int) -> int | None:
    """Smallest clique size the held-out (control) captions did not reach, at least ``minimum``;
    None when no control caption was probed (the rule cannot be calibrated)."""
    if not control_cliques:
        return None
    return max(int(minimum), max(control_cliques) + 1)


def leak_p_value(matched: np.ndarray, is_member: np.ndarray) -> float:
    """Exact one-sided permutation p-value of "no leak" from the matches of a random member / held-out split:
    P[at least this many of the matches fall on members] when membership is independent of the model
    (hypergeometric; Fisher's exact test). 1.0 when nothing matched."""
    from scipy import stats

    matched, is_member = np.asarray(matched, bool), np.asarray(is_member, bool)
    k = int(matched.sum())
    if k == 0:
        return 1.0
    return float(stats.hypergeom.sf(int((matched & is_member).sum()) - 1, len(matched), int(is_member.sum()), k))


def _item_cliques(gen_c: np.ndarray, items_c: np.ndarray, *, threshold: float, grid: int) -> np.ndarray:
    """Per item: the size of the largest clique of these generations (pairwise tiled L2 <= threshold) whose
    members all lie within ``threshold`` (tiled L2) of the item."""
    near = _min_over_flips(lambda a, b: cross_tiled_l2(a, b, grid=grid), gen_c, items_c) <= threshold  # [g, i]
    pair = pairwise_tiled_l2(gen_c, grid=grid)
    out = np.zeros(items_c.shape[0], dtype=np.int64)
    for k in range(items_c.shape[0]):
        idx = np.flatnonzero(near[:, k])
        if idx.size:
            out[k] = len(largest_clique(pair[np.ix_(idx, idx)], threshold=threshold))
    return out


def run_extraction(ctx: ProbeContext, cfg, *, budget_images: int | None = None, confidence: float = 0.95) -> dict:
    from dpdiff.models.pipeline import generate
    from dpdiff.probes.audit import detectable_epsilon, one_run_audit
    from dpdiff.probes.stats import clopper_pearson
    from dpdiff.probes.verdict import three_way_verdict, to_detect_twice_the_claim, verdict_fields

    t0 = time.time()
    per = int(required(cfg, "per_caption"))
    warnings: list[str] = []
    max_caps = int(required(cfg, "captions") or 0) or None
    if budget_images:
        allowed = max(1, int(budget_images) // max(per, 1))
        max_caps = allowed if max_caps is None else min(max_caps, allowed)
    thr_cfg = float(cfg.get("l2_threshold", 0.15))
    clique_thr = float(required(cfg, "clique_threshold"))
    grid = int(required(cfg, "tile_grid"))
    max_fmr = float(required(cfg, "max_heldout_false_match_rate"))
    size = min(int(ctx.resolution), int(required(cfg, "match_resolution") or ctx.resolution))
    batch = int(required(cfg, "batch_images"))
    dp = bool(ctx.privacy.get("dp"))
    claimed = ctx.privacy.get("epsilon") if dp else None
    delta = float(ctx.privacy["delta"]) if dp else float(required(cfg, "delta_if_no_dp"))
    alpha = 1.0 - confidence

    # one record per privacy unit (one coin each), a stratified uniform draw of each side
    members = ctx.one_record_per_unit(list(ctx.member_records))
    held = ctx.one_record_per_unit(list(ctx.nonmember_records))
    want = int(required(cfg, "units"))
    fit = units_for_budget(ctx, members + held, units=want, max_captions=max_caps)
    if fit < want:
        warnings.append(f"the generation budget ({max_caps} captions x {per} generations) allows about {fit} of the "
                        f"{want} units per side configured")
    mem_ids, hold_ids = draw_units(members, held, units=fit, seed=ctx.seed)
    item_ids = mem_ids + hold_ids
    is_member = np.r_[np.ones(len(mem_ids), bool), np.zeros(len(hold_ids), bool)]
    captions = sorted({ctx.records[i].text for i in item_ids})
    cap_index = {c: k for k, c in enumerate(captions)}

    gen = np.zeros((0, size, size, 3), np.float32)
    if captions:
        pipe = ctx.pipeline()
        prompts = [ctx.prompt(c) for c in captions for _ in range(per)]
        seeds = [ctx.seed * 100003 + j for _ in captions for j in range(per)]
        images = generate(pipe, prompts, seeds=seeds, steps=int(required(cfg, "steps")),
                          guidance_scale=float(required(cfg, "guidance_scale")),
                          batch_size=int(required(cfg, "batch_size")), progress=True)
        gen = _area_resize(pil_to_float(images), size)
    gen_seconds = time.time() - t0

    # item scores against the generations of the item's own caption
    item_imgs = _load_images(ctx, item_ids, size) if item_ids else np.zeros((0, size, size, 3), np.float32)
    item_l2 = np.full(len(item_ids), np.inf)
    item_tiled = np.full(len(item_ids), np.inf)
    item_clique = np.zeros(len(item_ids), dtype=np.int64)
    item_gen = np.zeros(len(item_ids), dtype=np.int64)
    for c, ci in cap_index.items():
        ks = np.array([k for k, i in enumerate(item_ids) if ctx.records[i].text == c])
        g = gen[ci * per : (ci + 1) * per]
        d = _min_over_flips(cross_l2, item_imgs[ks], g)
        item_l2[ks] = d.min(1)
        item_gen[ks] = ci * per + d.argmin(1)
        item_tiled[ks] = _min_over_flips(lambda a, b: cross_tiled_l2(a, b, grid=grid), item_imgs[ks], g).min(1)
        item_clique[ks] = _item_cliques(g, item_imgs[ks], threshold=clique_thr, grid=grid)

    # does the threshold separate? up to calibration_heldout held-out images against every training image
    rng = np.random.default_rng([int(ctx.seed), 0xCA1])
    calib = held if len(held) <= int(required(cfg, "calibration_heldout")) else sorted(
        rng.choice(held, size=int(required(cfg, "calibration_heldout")), replace=False).tolist())
    all_train = list(ctx.member_records)
    heldout_nearest = (nearest_training(ctx, _load_images(ctx, calib, size), all_train, size=size, batch=batch)[0]
                       if calib and all_train else None)
    thr = calibrated_threshold(l2_threshold=thr_cfg, heldout_nearest=heldout_nearest, max_false_match_rate=max_fmr)
    nearest_l2 = (nearest_training(ctx, gen, all_train, size=size, batch=batch)[0] if len(gen) and all_train
                  else np.zeros(0))

    # the base VAE's floor on the probed training images (at the matching resolution)
    floor_ids = mem_ids[: int(required(cfg, "vae_floor_images"))]
    floor = vae_floor(ctx, floor_ids, size=size) if floor_ids and required(cfg, "vae_floor") else np.zeros(0)
    floor_median = float(np.median(floor)) if floor.size else None

    # optional independent detector
    feat_path = cfg.get("feature_extractor")
    item_feat = None
    feat_thr = float(required(cfg, "feature_threshold"))
    if feat_path and item_ids:
        sim = feature_similarity(feat_path, gen, item_imgs, ctx.device)
        item_feat = np.array([sim[cap_index[ctx.records[i].text] * per : (cap_index[ctx.records[i].text] + 1) * per,
                                  k].max() for k, i in enumerate(item_ids)])

    extracted = is_member & (item_l2 <= thr)
    control_match = ~is_member & (item_l2 <= thr)
    n_mem_items, n_ctl_items = int(is_member.sum()), int((~is_member).sum())

    # the verdict: every detector through the one-run analysis of the probed split (Bonferroni)
    detectors = {"l2": -item_l2, "tiled_l2": -item_tiled, "clique": item_clique.astype(np.float64)}
    if item_feat is not None:
        detectors["feature"] = item_feat
    per_det = 1.0 - alpha / len(detectors)
    split, eps_lower, ceiling = None, None, None
    blockers: list[str] = []
    if n_mem_items and n_ctl_items:
        order = np.random.default_rng([int(ctx.seed), 13]).permutation(len(item_ids))  # label-blind tie order
        split = {}
        for name, sc in detectors.items():
            res = one_run_audit(scores=sc[order], included=is_member[order], delta=delta, confidence=per_det,
                                fixed_count=True)
            res.pop("per_choice", None)
            split[name] = res
        eps_lower = max(r["eps_lower"] for r in split.values())
        ceiling = max(r["ceiling"] for r in split.values())
    elif claimed is not None or not dp:
        eps_lower, ceiling = 0.0, 0.0  # no controls: nothing can be certified either way
    # "is there any leak?" (runs without DP): exact permutation tests of the matches, Bonferroni over detectors
    matches = {"l2": item_l2 <= thr, "tiled_l2": item_tiled <= clique_thr}
    leak_p = min(1.0, len(matches) * min(leak_p_value(m, is_member) for m in matches.values())) \
        if n_mem_items and n_ctl_items else None
    if floor_median is not None and floor_median > thr:
        blockers.append(f"the base VAE reconstructs the probed training images at L2 {floor_median:.3g} (median), "
                        f"above the threshold {thr:.3g}: no generation can come that close, extraction could "
                        "never fire")
    fmr_cfg = float(np.mean(heldout_nearest <= thr_cfg)) if heldout_nearest is not None else None
    if fmr_cfg is not None and fmr_cfg > max_fmr and thr < thr_cfg:
        warnings.append(f"{fmr_cfg:.0%} of held-out images lie within L2 {thr_cfg:g} of a training image: that "
                        f"threshold does not separate; the calibrated threshold {thr:.3g} is used")
    if heldout_nearest is None:
        blockers.append("no held-out images: the threshold cannot be checked against unseen images")
    balanced_n = min(n_mem_items, n_ctl_items)
    power = None
    if split and claimed is not None:  # the optimal attacker is one of the detectors, at their level
        power = detectable_epsilon(claimed_epsilon=float(claimed), m=2 * balanced_n, included=balanced_n,
                                   delta=delta, confidence=per_det, fixed_count=True, seed=ctx.seed)
    if claimed is None:
        to_conclude = "the run has no DP guarantee: only a FAIL (leak shown) is possible"
    elif power is None or power["detectable_epsilon"] is None or power["detectable_epsilon"] > 2 * float(claimed):
        to_conclude = to_detect_twice_the_claim(
            claimed_epsilon=float(claimed), delta=delta, confidence=per_det, fixed_count=True, now=balanced_n,
            seed=ctx.seed, what="probed training units and as many held-out ones (probes.extraction.units)")
    else:
        to_conclude = ""
    if floor_median is not None and floor_median > thr:
        to_conclude += "; a base whose VAE reconstructs these images (or a larger threshold that held-out images " \
                       "still do not reach)"
    v = three_way_verdict(claimed_epsilon=claimed, eps_lower=eps_lower, ceiling=ceiling, confidence=confidence,
                          blockers=blockers, to_conclude=to_conclude or None,
                          not_estimable=None if split else "no held-out units to compare the training images with",
                          detectable_epsilon=power["detectable_epsilon"] if power else None,
                          leak_p_value=leak_p)

    # cliques per caption, calibrated on captions whose probed items are all held out
    per_caption, control_cliques = [], []
    for c, ci in cap_index.items():
        ks = [k for k, i in enumerate(item_ids) if ctx.records[i].text == c]
        clique = largest_clique(pairwise_tiled_l2(gen[ci * per : (ci + 1) * per], grid=grid), threshold=clique_thr)
        n_m = int(is_member[ks].sum())
        kind = "member" if n_m == len(ks) else ("control" if n_m == 0 else "mixed")
        if kind == "control":
            control_cliques.append(len(clique))
        per_caption.append({"caption_index": ci, "caption": c, "kind": kind, "training_items": n_m,
                            "heldout_items": len(ks) - n_m, "largest_clique": len(clique),
                            "extracted": int(extracted[ks].sum()), "control_matches": int(control_match[ks].sum())})
    size_thr = clique_size_threshold(control_cliques, minimum=int(required(cfg, "clique_min_size")))
    for pc in per_caption:
        pc["clique_flagged"] = bool(size_thr is not None and pc["kind"] != "control"
                                    and pc["largest_clique"] >= size_thr)

    details = []
    flagged = np.flatnonzero(extracted | control_match)
    for k in flagged[: int(required(cfg, "max_flagged"))]:
        g = int(item_gen[k])
        d = {"item": ctx.records[item_ids[k]].key, "member": bool(is_member[k]), "generation": g,
             "caption_index": g // per, "l2": float(item_l2[k]), "tiled_l2": float(tiled_l2(gen[g], item_imgs[k],
                                                                                            grid=grid)),
             "clique": int(item_clique[k]), "ssim": float(ssim(gen[g], item_imgs[k])),
             "phash_distance": int(phash_distance(gen[g], item_imgs[k]))}
        if item_feat is not None:
            d["feature_cosine"] = float(item_feat[k])
        details.append(d)

    n_ext = int(extracted.sum())
    rate_upper = clopper_pearson(n_ext, n_mem_items, alpha=alpha)[1] if n_mem_items else None
    if n_mem_items and per < 64:
        warnings.append(f"{per} generations per caption (Carlini et al. used 500): memorisation that shows in fewer "
                        f"than 1 of {per} generations is not seen")
    grid_path = _flagged_grid(ctx.run_dir, gen, item_imgs, flagged, item_gen, is_member) if ctx.run_dir else None
    return {
        "extracted_count": n_ext,
        "near_copy_count": n_ext,  # older readers' name for the matches at the calibrated threshold
        "rate": n_ext / n_mem_items if n_mem_items else None,
        "rate_upper": rate_upper,
        "training_items_probed": n_mem_items,
        "heldout_items_probed": n_ctl_items,
        "control_matches": int(control_match.sum()),
        "control_false_match_rate": float(control_match.sum() / n_ctl_items) if n_ctl_items else None,
        "tiled_matches": int((is_member & (item_tiled <= clique_thr)).sum()),
        "tiled_control_matches": int((~is_member & (item_tiled <= clique_thr)).sum()),
        "leak_p_value": leak_p,
        "heldout_false_match_rate": fmr_cfg,
        "heldout_false_match_rate_calibrated": (float(np.mean(heldout_nearest <= thr))
                                                if heldout_nearest is not None else None),
        "calibration_heldout_images": len(calib),
        "l2_threshold_configured": thr_cfg,
        "l2_threshold": thr,
        "match_resolution": size,
        "vae_floor_median": floor_median,
        "vae_floor_p90": float(np.quantile(floor, 0.9)) if floor.size else None,
        "feature_matches": (int((is_member & (item_feat >= feat_thr)).sum()) if item_feat is not None else None),
        "feature_control_matches": (int((~is_member & (item_feat >= feat_thr)).sum())
                                    if item_feat is not None else None),
        "generations": len(gen),
        "generation_resolution": int(ctx.resolution),
        "captions_probed": len(captions),
        "per_caption_generations": per,
        "tile_grid": grid,
        "detectors": list(detectors),
        "max_clique": max((c["largest_clique"] for c in per_caption), default=0),
        "clique_size_threshold": size_thr,
        "clique_flagged_captions": sum(c["clique_flagged"] for c in per_caption),
        "per_caption": per_caption,
        "generations_matching_any_training_image": int((nearest_l2 <= thr).sum()),
        "nearest_l2_p5_generations": float(np.quantile(nearest_l2, 0.05)) if nearest_l2.size else None,
        "nearest_l2_median_generations": float(np.median(nearest_l2)) if nearest_l2.size else None,
        "heldout_nearest_l2_p5": float(np.quantile(heldout_nearest, 0.05)) if heldout_nearest is not None else None,
        "heldout_nearest_l2_median": float(np.median(heldout_nearest)) if heldout_nearest is not None else None,
        "balanced_items": balanced_n,
        "split_audit": split,
        "delta": delta,
        **verdict_fields(v),
        "warnings": warnings,
        "flagged": details,
        "extracted_items": sorted(ctx.records[item_ids[k]].key for k in np.flatnonzero(extracted))[:50],
        "flagged_grid": grid_path.name if grid_path else None,
        "generation_seconds": round(gen_seconds, 2),
        "seconds": round(time.time() - t0, 2),
        "note": "units drawn at random from the training and the held-out units (as many of each); rate = probed "
                "training images within the threshold of a generation of their caption; control_false_match_rate "
                "= the same for held-out images (never trained on); the verdict compares the two with the one-run "
                "analysis of the random split (l2, tiled L2 and clique detectors, Bonferroni) and, without DP, "
                "an exact permutation test",
    }


def _flagged_grid(run_dir: Path, gen, items, flagged, item_gen, is_member, limit: int = 16) -> Path | None:
    """Side-by-side PNG: generation | its matched image, a blue mark for a training image, grey for a
    held-out control (a label, not a verdict)."""
    from PIL import Image

    from dpdiff.models.pipeline import image_grid

    if len(flagged) == 0:
        return None
    tiles = []
    for k in flagged[:limit]:
        a = Image.fromarray((gen[int(item_gen[k])] * 255).round().astype(np.uint8))
        b = Image.fromarray((items[k] * 255).round().astype(np.uint8))
        mark = Image.new("RGB", (a.width // 4 or 1, a.height), (9, 105, 218) if is_member[k] else (140, 149, 159))
        pair = Image.new("RGB", (a.width * 2 + mark.width, a.height), "white")
        pair.paste(a, (0, 0))
        pair.paste(mark, (a.width, 0))
        pair.paste(b, (a.width + mark.width, 0))
        tiles.append(pair)
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    tiles += [Image.new("RGB", tiles[0].size, "white")] * (rows * cols - len(tiles))
    img = image_grid(tiles, rows=rows, cols=cols, pad=6)
    scale = max(1, 256 // tiles[0].height)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(run_dir) / "probe_extraction.png"
    img.save(path)
    return path
