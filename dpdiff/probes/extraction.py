"""Training-data extraction, Carlini et al. 2023 ("Extracting Training Data from Diffusion Models").

Generate-and-filter: for training captions (the most duplicated first, then a seeded sample),
generate N images per caption with fixed seeds; a caption whose generations form a large clique
of near-identical images (tiled L2 <= threshold) is a memorisation signal even without access to
the training set; with the training set (the data owner's view), each generation is compared to
every training image: L2 and tiled L2 (Carlini's), minimum over horizontal flips, then SSIM,
perceptual-hash distance and VAE-latent distance for its nearest image, and optionally the cosine
similarity of a user-supplied feature extractor (SSCD torchscript).

Verdicts: ``extracted`` when L2 <= ``l2_threshold`` (Carlini's delta, 0.15 on [0,1] pixels);
``near_copy`` when its nearest-training distance is below the ``near_copy_quantile`` of what
held-out non-member images achieve against the same training set (a calibrated threshold: real
unseen images of the same distribution rarely come that close). The held-out images' own false-
match rates at both thresholds are reported. Follows LeakPro's carlini extraction (tiled L2,
cliques) with the held-out calibration added.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dpdiff.probes.cliques import largest_clique
from dpdiff.probes.context import ProbeContext, encode_images, pil_to_float
from dpdiff.probes.metrics import cross_l2, cross_tiled_l2, pairwise_tiled_l2, phash_distance, ssim


def choose_captions(ctx: ProbeContext, *, count: int, seed: int) -> list[tuple[str, int]]:
    """(caption, number of training images with it): most duplicated first, then a random sample."""
    counts = Counter(ctx.records[i].text for i in ctx.member_records)
    dup = [(c, n) for c, n in counts.most_common() if n > 1]
    chosen = dup[: count // 2 if len(counts) > count else count]
    rest = [(c, n) for c, n in counts.items() if (c, n) not in chosen]
    rng = np.random.default_rng(seed)
    k = min(count - len(chosen), len(rest))
    if k > 0:
        picks = rng.choice(len(rest), size=k, replace=False)
        chosen += [rest[i] for i in sorted(picks)]
    return chosen


def _load_images(ctx: ProbeContext, ids: list[int]) -> np.ndarray:
    from dpdiff.data.preprocess import from_pixels, to_pixels

    return pil_to_float([from_pixels(to_pixels(ctx.records[i].open(), resolution=ctx.resolution)) for i in ids])


def _min_over_flips(fn, gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.minimum(fn(gen, ref), fn(gen, ref[:, :, ::-1]))


def _feature_similarity(path: str | None, gen: np.ndarray, ref: np.ndarray, device) -> np.ndarray | None:
    """Cosine similarity from a local torchscript feature extractor (e.g. SSCD); nothing is downloaded."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        from dpdiff.errors import UserError

        raise UserError(f"probes.extraction.feature_extractor={path} does not exist (a local torchscript file)")
    model = torch.jit.load(str(p), map_location=device).eval()

    def emb(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float().to(device)
        t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
        with torch.no_grad():
            e = model((t - mean) / std)
        return torch.nn.functional.normalize(e.float(), dim=-1)

    return (emb(gen) @ emb(ref).T).cpu().numpy()


def run_extraction(ctx: ProbeContext, cfg, *, budget_images: int | None = None) -> dict:
    t0 = time.time()
    n_caps = int(cfg.get("captions", 8))
    per = int(cfg.get("per_caption", 16))
    if budget_images:
        n_caps = max(1, min(n_caps, budget_images // max(per, 1)))
    thr = float(cfg.get("l2_threshold", 0.15))
    clique_thr = float(cfg.get("clique_threshold", thr))
    grid = int(cfg.get("tile_grid", 4))
    q_near = float(cfg.get("near_copy_quantile", 0.01))
    captions = choose_captions(ctx, count=n_caps, seed=ctx.seed)

    from dpdiff.models.pipeline import generate

    pipe = ctx.pipeline()
    prompts = [c for c, _ in captions for _ in range(per)]
    seeds = [ctx.seed * 100003 + j for _ in captions for j in range(per)]
    images = generate(pipe, prompts, seeds=seeds, steps=int(cfg.get("steps", 20)),
                      guidance_scale=float(cfg.get("guidance_scale", 3.0)), batch_size=int(cfg.get("batch_size", 64)),
                      progress=True)
    gen = pil_to_float(images)
    gen_seconds = time.time() - t0

    train_ids = list(ctx.member_records)
    train = _load_images(ctx, train_ids)
    l2 = _min_over_flips(cross_l2, gen, train)
    tl2 = _min_over_flips(lambda a, b: cross_tiled_l2(a, b, grid=grid), gen, train)
    nearest = l2.argmin(1)
    nearest_l2 = l2[np.arange(len(gen)), nearest]
    nearest_tl2 = tl2.min(1)

    # held-out calibration: how close do unseen images of the same distribution come?
    held = _load_images(ctx, list(ctx.nonmember_records)) if ctx.nonmember_records else None
    baseline = {}
    near_thr = None
    if held is not None and len(held):
        held_l2 = _min_over_flips(cross_l2, held, train).min(1)
        near_thr = float(np.quantile(held_l2, q_near))
        baseline = {
            "heldout_images": len(held),
            "heldout_false_match_rate": float(np.mean(held_l2 <= thr)),
            "heldout_near_copy_rate": float(np.mean(held_l2 <= near_thr)),
            "near_copy_threshold": near_thr,
            "heldout_nearest_l2_p5": float(np.quantile(held_l2, 0.05)),
            "heldout_nearest_l2_median": float(np.median(held_l2)),
        }

    extracted = nearest_l2 <= thr
    near_copy = (nearest_l2 <= near_thr) if near_thr is not None else np.zeros_like(extracted)
    flagged = np.flatnonzero(extracted | near_copy)

    # richer metrics on each generation's nearest training image
    gen_lat = train_lat = None
    if cfg.get("latent_distance", True) and len(flagged):
        near_set = sorted({int(nearest[g]) for g in flagged})
        gen_lat = encode_images(ctx, images)
        train_lat = encode_images(ctx, [ctx.records[train_ids[j]] for j in near_set])
        lat_index = {j: k for k, j in enumerate(near_set)}
    feat = _feature_similarity(cfg.get("feature_extractor"), gen, train, ctx.device)

    per_caption = []
    for ci, (cap, n_train) in enumerate(captions):
        sl = slice(ci * per, (ci + 1) * per)
        clique = largest_clique(pairwise_tiled_l2(gen[sl], grid=grid), threshold=clique_thr)
        per_caption.append({"caption_index": ci, "caption": cap, "training_images_with_caption": int(n_train),
                            "largest_clique": len(clique), "extracted": int(extracted[sl].sum()),
                            "near_copies": int(near_copy[sl].sum())})

    details = []
    for g in flagged[: int(cfg.get("max_flagged", 32))]:
        j = int(nearest[g])
        d = {"generation": int(g), "caption_index": int(g // per), "training_item": ctx.records[train_ids[j]].key,
             "l2": float(nearest_l2[g]), "tiled_l2": float(tl2[g, j]), "ssim": float(ssim(gen[g], train[j])),
             "phash_distance": int(phash_distance(gen[g], train[j])),
             "verdict": "extracted" if extracted[g] else "near_copy"}
        if gen_lat is not None:
            d["latent_rms"] = float((gen_lat[g] - train_lat[lat_index[j]]).pow(2).mean().sqrt())
        if feat is not None:
            d["feature_cosine"] = float(feat[g, j])
        details.append(d)

    extracted_items = sorted({ctx.records[train_ids[int(nearest[g])]].key for g in np.flatnonzero(extracted)})
    near_items = sorted({ctx.records[train_ids[int(nearest[g])]].key for g in np.flatnonzero(near_copy)})
    probed_items = sum(n for _, n in captions)
    grid_path = _flagged_grid(ctx.run_dir, gen, train, flagged, nearest, extracted)
    return {
        "extracted_count": len(extracted_items),
        "rate": len(extracted_items) / max(probed_items, 1),
        "near_copy_count": len(near_items),
        "generations": len(gen),
        "extracted_generations": int(extracted.sum()),
        "captions_probed": len(captions),
        "training_items_probed": probed_items,
        "l2_threshold": thr,
        "tile_grid": grid,
        "max_clique": max((c["largest_clique"] for c in per_caption), default=0),
        "per_caption": per_caption,
        "nearest_l2_p5_generations": float(np.quantile(nearest_l2, 0.05)),
        "nearest_l2_median_generations": float(np.median(nearest_l2)),
        "nearest_tiled_l2_median_generations": float(np.median(nearest_tl2)),
        **baseline,
        "flagged": details,
        "extracted_items": extracted_items[:50],
        "flagged_grid": grid_path.name if grid_path else None,
        "generation_seconds": round(gen_seconds, 2),
        "seconds": round(time.time() - t0, 2),
        "note": "rate = distinct extracted training images / training images whose captions were probed; "
                "p5 of nearest-training L2 = the 95th percentile of similarity",
    }


def _flagged_grid(run_dir: Path, gen, train, flagged, nearest, extracted, limit: int = 16) -> Path | None:
    """Side-by-side PNG: generation | its nearest training image, one pair per row block."""
    from PIL import Image

    from dpdiff.models.pipeline import image_grid

    if len(flagged) == 0:
        return None
    tiles = []
    for g in flagged[:limit]:
        a = Image.fromarray((gen[g] * 255).round().astype(np.uint8))
        b = Image.fromarray((train[int(nearest[g])] * 255).round().astype(np.uint8))
        mark = Image.new("RGB", (a.width // 4 or 1, a.height), (207, 34, 46) if extracted[g] else (191, 135, 0))
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
