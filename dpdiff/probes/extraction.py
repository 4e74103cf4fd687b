"""Training-data extraction, Carlini et al. 2023 ("Extracting Training Data from Diffusion Models",
USENIX Security), with held-out controls so that its answer means something.

Design. Captions are chosen without looking at the member / held-out split (the most repeated
captions of the whole dataset first, then a seeded sample), and ``per_caption`` images are
generated for each, *at the training resolution*. Every dataset image whose caption was probed
(up to ``items_per_caption`` of each, seeded) is an *item*: members are training images, held-out
items are the controls, generated for in exactly the same way. An item's score is how close the
generations of its caption come to it: minus the smallest RMS pixel distance (Carlini's L2, the
minimum over a horizontal flip). Then:

* ``extracted``: member items within the threshold; the held-out ``control_false_match_rate`` is
  the same count on the controls, and ``heldout_false_match_rate`` the share of held-out images
  that lie within the threshold of *some* training image (when that is high the threshold does not
  separate: a generation "matching" a training image says nothing).
* The threshold in use is ``min(l2_threshold, q-quantile of the held-out images' nearest-training
  distance)`` with ``q = max_heldout_false_match_rate``: calibrated so held-out images rarely match.
* VAE floor: the base VAE's own reconstruction distance of the probed training images. A
  generation is decoded by that VAE, so it cannot come closer than the floor; a floor above the
  threshold means extraction could never fire (INCONCLUSIVE, not a clean bill).
* Verdict: the member and held-out items form a random split (balanced by subsampling), so the
  one-run analysis of ``dpdiff.probes.audit`` applied to their scores (``fixed_count=True``) gives an
  epsilon lower bound and its ceiling; ``dpdiff.probes.verdict`` turns them into PASS / FAIL /
  INCONCLUSIVE against the claimed epsilon. A red needs this test, never a bare count.
* ``rate_upper``: the one-sided Clopper-Pearson upper bound on the extraction rate, instead of a
  bare "0 extracted"; ``warnings`` say when the generation budget makes the probe weak.
* Carlini's clique rule (Sec. 4.2.1): per caption, the largest clique of generations within the
  tiled-L2 ``clique_threshold``; a caption is flagged when its clique reaches the size that held-out
  (control) captions never reach (``clique_size_threshold``), not a fixed size.
* Optional independent detector: a local torchscript copy-detection model (SSCD, Pizzi et al. 2022),
  batched; its cosine similarity is a second item score in the one-run analysis (Bonferroni over
  the detectors) and counts as a match at ``feature_threshold``.

Followed: LeakPro's carlini extraction (tiled L2, cliques); Somepalli et al. 2023 for SSCD.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dpdiff.probes.cliques import largest_clique
from dpdiff.probes.context import ProbeContext, pil_to_float
from dpdiff.probes.metrics import cross_l2, pairwise_tiled_l2, phash_distance, ssim, tiled_l2


def choose_captions(records: list, candidate_ids: list[int], *, count: int, seed: int) -> list[str]:
    """Up to ``count`` captions of ``candidate_ids``, label-blind: the most repeated first (half of
    ``count`` when there are more captions than that), then a seeded sample of the rest. Ties are
    broken by the caption text, so the choice depends on the captions alone."""
    counts = Counter(records[i].text for i in candidate_ids)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    dup = [c for c, n in ranked if n > 1]
    chosen = dup[: count // 2 if len(counts) > count else count]
    rest = sorted(c for c in counts if c not in set(chosen))
    k = min(count - len(chosen), len(rest))
    if k > 0:
        picks = np.random.default_rng(seed).choice(len(rest), size=k, replace=False)
        chosen += [rest[i] for i in sorted(picks)]
    return chosen


def _load_images(ctx: ProbeContext, ids: list[int]) -> np.ndarray:
    from dpdiff.data.preprocess import from_pixels, to_pixels

    return pil_to_float([from_pixels(to_pixels(ctx.records[i].open(), resolution=ctx.resolution)) for i in ids])


def _min_over_flips(fn, gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.minimum(fn(gen, ref), fn(gen, ref[:, :, ::-1]))


@torch.no_grad()
def vae_floor(ctx: ProbeContext, ids: list[int], *, batch_size: int = 16) -> np.ndarray:
    """RMS pixel distance between each image and the base VAE's reconstruction of it (posterior mean),
    on [0, 1] pixels at the training resolution: the closest any generation can come to it."""
    from dpdiff.data.preprocess import to_pixels

    vae = ctx.base.vae
    out = []
    for s in range(0, len(ids), batch_size):
        px = torch.stack([to_pixels(ctx.records[i].open(), resolution=ctx.resolution)
                          for i in ids[s : s + batch_size]]).to(ctx.device, vae.dtype)
        rec = vae.decode(vae.encode(px).latent_dist.mean, return_dict=False)[0]
        a = (px.float().clamp(-1, 1) + 1) / 2
        b = (rec.float().clamp(-1, 1) + 1) / 2
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


def _balanced(ids_mem: list[int], ids_hold: list[int], seed: int) -> tuple[list[int], list[int]]:
    n = min(len(ids_mem), len(ids_hold))
    rng = np.random.default_rng(seed)
    pick = lambda ids: sorted(rng.choice(ids, size=n, replace=False).tolist()) if len(ids) > n else list(ids)  # noqa: E731
    return pick(ids_mem), pick(ids_hold)


def run_extraction(ctx: ProbeContext, cfg, *, budget_images: int | None = None, confidence: float = 0.95) -> dict:
    from dpdiff.models.pipeline import generate
    from dpdiff.probes.audit import detectable_epsilon, one_run_audit
    from dpdiff.probes.stats import clopper_pearson
    from dpdiff.probes.verdict import three_way_verdict, to_detect_twice_the_claim, verdict_fields

    t0 = time.time()
    n_caps = int(cfg.get("captions", 16))
    per = int(cfg.get("per_caption", 16))
    warnings: list[str] = []
    if budget_images:
        allowed = max(1, int(budget_images) // max(per, 1))
        if allowed < n_caps:
            warnings.append(f"budget_images={budget_images} allowed {allowed} of the {n_caps} captions configured")
            n_caps = allowed
    thr_cfg = float(cfg.get("l2_threshold", 0.15))
    clique_thr = float(cfg.get("clique_threshold", thr_cfg))
    grid = int(cfg.get("tile_grid", 4))
    max_fmr = float(cfg.get("max_heldout_false_match_rate", 0.05))
    items_per = int(cfg.get("items_per_caption", 16))
    dp = bool(ctx.privacy.get("dp"))
    claimed = ctx.privacy.get("epsilon") if dp else None
    delta = float(ctx.privacy["delta"]) if dp else float(cfg.get("delta_if_no_dp", 1e-5))

    members, held = list(ctx.member_records), list(ctx.nonmember_records)
    member_set = set(members)
    captions = choose_captions(ctx.records, members + held, count=n_caps, seed=ctx.seed)
    by_caption: dict[str, list[int]] = {c: [] for c in captions}
    for i in ctx.one_record_per_unit(members + held):  # one item per privacy unit: one coin each
        if ctx.records[i].text in by_caption:
            by_caption[ctx.records[i].text].append(i)
    rng = np.random.default_rng(ctx.seed + 7)
    for c, ids in by_caption.items():  # label-blind cap on the items of one caption
        if len(ids) > items_per:
            by_caption[c] = sorted(rng.choice(ids, size=items_per, replace=False).tolist())

    pipe = ctx.pipeline()
    prompts = [c for c in captions for _ in range(per)]
    seeds = [ctx.seed * 100003 + j for _ in captions for j in range(per)]
    images = generate(pipe, prompts, seeds=seeds, steps=int(cfg.get("steps", 20)),
                      guidance_scale=float(cfg.get("guidance_scale", 3.0)), batch_size=int(cfg.get("batch_size", 64)),
                      progress=True)
    gen = pil_to_float(images)
    gen_seconds = time.time() - t0

    # item scores: how close the generations of an item's own caption come to it
    item_ids = [i for c in captions for i in by_caption[c]]
    item_imgs = _load_images(ctx, item_ids) if item_ids else np.zeros((0, *gen.shape[1:]), np.float32)
    item_l2 = np.empty(len(item_ids))
    item_gen = np.empty(len(item_ids), dtype=np.int64)
    pos = 0
    for ci, c in enumerate(captions):
        ids = by_caption[c]
        if not ids:
            continue
        d = _min_over_flips(cross_l2, item_imgs[pos : pos + len(ids)], gen[ci * per : (ci + 1) * per])
        item_l2[pos : pos + len(ids)] = d.min(1)
        item_gen[pos : pos + len(ids)] = ci * per + d.argmin(1)
        pos += len(ids)
    is_member = np.array([i in member_set for i in item_ids], dtype=bool)

    # does the threshold separate? held-out images against the whole training set
    train = _load_images(ctx, members)
    heldout_nearest = _min_over_flips(cross_l2, _load_images(ctx, held), train).min(1) if held else None
    thr = calibrated_threshold(l2_threshold=thr_cfg, heldout_nearest=heldout_nearest, max_false_match_rate=max_fmr)
    gen_nearest_l2 = _min_over_flips(cross_l2, gen, train)
    nearest = gen_nearest_l2.argmin(1)
    nearest_l2 = gen_nearest_l2[np.arange(len(gen)), nearest]

    # the base VAE's floor on the probed training images
    floor_ids = [i for i in item_ids if i in member_set][: int(cfg.get("vae_floor_images", 32))]
    floor = vae_floor(ctx, floor_ids) if floor_ids and cfg.get("vae_floor", True) else np.zeros(0)
    floor_median = float(np.median(floor)) if floor.size else None

    # optional independent detector
    feat_path = cfg.get("feature_extractor")
    item_feat = None
    feat_thr = float(cfg.get("feature_threshold", 0.5))
    if feat_path and item_ids:
        sim = feature_similarity(feat_path, gen, item_imgs, ctx.device)
        item_feat = np.array([sim[ci * per : (ci + 1) * per, k].max()
                              for k, ci in enumerate(captions.index(ctx.records[i].text) for i in item_ids)])

    extracted = is_member & (item_l2 <= thr)
    control_match = ~is_member & (item_l2 <= thr)
    n_mem_items, n_ctl_items = int(is_member.sum()), int((~is_member).sum())
    alpha = 1.0 - confidence

    # the verdict: one-run analysis of the balanced member / held-out items
    mem_idx, ctl_idx = _balanced(list(np.flatnonzero(is_member)), list(np.flatnonzero(~is_member)), ctx.seed + 11)
    split = None
    blockers: list[str] = []
    if mem_idx and ctl_idx:
        sel = np.array(mem_idx + ctl_idx)
        inc = np.r_[np.ones(len(mem_idx), bool), np.zeros(len(ctl_idx), bool)]
        order = np.random.default_rng(ctx.seed + 13).permutation(len(sel))  # label-blind tie order
        sel, inc = sel[order], inc[order]
        detectors = {"l2": -item_l2[sel]}
        if item_feat is not None:
            detectors["feature"] = item_feat[sel]
        per_det = 1.0 - alpha / len(detectors)
        split = {name: one_run_audit(scores=sc, included=inc, delta=delta, confidence=per_det, fixed_count=True)
                 for name, sc in detectors.items()}
        for res in split.values():
            res.pop("per_choice", None)
    eps_lower = max((r["eps_lower"] for r in split.values()), default=None) if split else None
    ceiling = max((r["ceiling"] for r in split.values()), default=None) if split else None
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
    balanced_n = min(len(mem_idx), len(ctl_idx))
    power = None
    if split and claimed is not None:  # the optimal detector is one of the detectors, at their level
        power = detectable_epsilon(claimed_epsilon=float(claimed), m=len(mem_idx) + len(ctl_idx),
                                   included=len(mem_idx), delta=delta, confidence=per_det, fixed_count=True,
                                   seed=ctx.seed)
    if claimed is None:
        to_conclude = "the run has no DP guarantee: only a FAIL (leak shown) is possible"
    elif power is None or power["detectable_epsilon"] is None or power["detectable_epsilon"] > 2 * float(claimed):
        to_conclude = to_detect_twice_the_claim(
            claimed_epsilon=float(claimed), delta=delta, confidence=per_det if split else 1.0 - alpha / 2,
            fixed_count=True, now=balanced_n, seed=ctx.seed,
            what="probed training images and as many held-out ones (more captions or items_per_caption)")
    else:
        to_conclude = ""
    if floor_median is not None and floor_median > thr:
        to_conclude += "; a base whose VAE reconstructs these images (or a larger threshold that held-out images " \
                       "still do not reach)"
    not_estimable = None if split else ("no held-out items among the probed captions: nothing to compare the "
                                        "training images against")
    v = three_way_verdict(claimed_epsilon=claimed, eps_lower=eps_lower, ceiling=ceiling, confidence=confidence,
                          blockers=blockers, to_conclude=to_conclude or None, not_estimable=not_estimable,
                          detectable_epsilon=power["detectable_epsilon"] if power else None)
    if balanced_n and ceiling is not None and claimed is not None and ceiling <= claimed:
        warnings.append(f"{len(captions)} captions x {per} generations probe {balanced_n} training and {balanced_n} "
                        f"held-out images: the most this can certify is epsilon {ceiling:.3g}")

    # cliques, calibrated on captions whose probed items are all held out
    per_caption, control_cliques = [], []
    for ci, c in enumerate(captions):
        sl = slice(ci * per, (ci + 1) * per)
        clique = largest_clique(pairwise_tiled_l2(gen[sl], grid=grid), threshold=clique_thr)
        ids = by_caption[c]
        n_m = sum(1 for i in ids if i in member_set)
        kind = "member" if n_m == len(ids) and ids else ("control" if n_m == 0 and ids else "mixed")
        if kind == "control":
            control_cliques.append(len(clique))
        k0 = item_ids.index(ids[0]) if ids else 0
        sel = slice(k0, k0 + len(ids))
        per_caption.append({"caption_index": ci, "caption": c, "kind": kind, "training_items": n_m,
                            "heldout_items": len(ids) - n_m, "largest_clique": len(clique),
                            "extracted": int(extracted[sel].sum()), "control_matches": int(control_match[sel].sum())})
    size_thr = clique_size_threshold(control_cliques, minimum=int(cfg.get("clique_min_size", 3)))
    for pc in per_caption:
        pc["clique_flagged"] = bool(size_thr is not None and pc["kind"] != "control"
                                    and pc["largest_clique"] >= size_thr)

    details = []
    flagged = np.flatnonzero(extracted | control_match)
    for k in flagged[: int(cfg.get("max_flagged", 32))]:
        g = int(item_gen[k])
        d = {"item": ctx.records[item_ids[k]].key, "member": bool(is_member[k]), "generation": g,
             "caption_index": g // per, "l2": float(item_l2[k]),
             "tiled_l2": float(tiled_l2(gen[g], item_imgs[k], grid=grid)),
             "ssim": float(ssim(gen[g], item_imgs[k])), "phash_distance": int(phash_distance(gen[g], item_imgs[k]))}
        if item_feat is not None:
            d["feature_cosine"] = float(item_feat[k])
        details.append(d)

    n_ext = int(extracted.sum())
    rate_upper = clopper_pearson(n_ext, n_mem_items, alpha=alpha)[1] if n_mem_items else None
    if n_mem_items and per < 64:
        warnings.append(f"{per} generations per caption (Carlini et al. used 500): memorisation that shows in fewer "
                        f"than 1 of {per} generations is not seen")
    grid_path = _flagged_grid(ctx.run_dir, gen, item_imgs, flagged, item_gen, is_member)
    out = {
        "extracted_count": n_ext,
        "near_copy_count": n_ext,  # older readers' name for the matches at the calibrated threshold
        "rate": n_ext / n_mem_items if n_mem_items else None,
        "rate_upper": rate_upper,
        "training_items_probed": n_mem_items,
        "heldout_items_probed": n_ctl_items,
        "control_matches": int(control_match.sum()),
        "control_false_match_rate": float(control_match.sum() / n_ctl_items) if n_ctl_items else None,
        "heldout_false_match_rate": fmr_cfg,
        "heldout_false_match_rate_calibrated": (float(np.mean(heldout_nearest <= thr))
                                                if heldout_nearest is not None else None),
        "l2_threshold_configured": thr_cfg,
        "l2_threshold": thr,
        "vae_floor_median": floor_median,
        "vae_floor_p90": float(np.quantile(floor, 0.9)) if floor.size else None,
        "feature_matches": (int((is_member & (item_feat >= feat_thr)).sum()) if item_feat is not None else None),
        "feature_control_matches": (int((~is_member & (item_feat >= feat_thr)).sum())
                                    if item_feat is not None else None),
        "generations": len(gen),
        "generation_resolution": int(gen.shape[1]),
        "captions_probed": len(captions),
        "per_caption_generations": per,
        "tile_grid": grid,
        "max_clique": max((c["largest_clique"] for c in per_caption), default=0),
        "clique_size_threshold": size_thr,
        "clique_flagged_captions": sum(c["clique_flagged"] for c in per_caption),
        "per_caption": per_caption,
        "generations_matching_any_training_image": int((nearest_l2 <= thr).sum()),
        "nearest_l2_p5_generations": float(np.quantile(nearest_l2, 0.05)),
        "nearest_l2_median_generations": float(np.median(nearest_l2)),
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
        "note": "rate = probed training images within the threshold of a generation of their caption; "
                "control_false_match_rate = the same for held-out images (never trained on); the verdict "
                "compares the two with the one-run analysis of the random split",
    }
    return out


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
