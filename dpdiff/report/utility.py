"""Utility metrics of a trained model, pluggable (a name -> function registry).

* ``heldout_loss``: the denoising loss on held-out (never trained) images, fine-tuned vs base,
  over fixed timesteps and shared noise draws. It reads held-out private images: named in the
  report's caveats.
* ``digit_accuracy`` (built-in demo only): a classifier trained on real digits (scikit-learn's SVC
  on all 1,797 8x8 digits) labels images generated from "a handwritten digit k"; the accuracy per
  digit says whether the model draws the digit it is asked for.
* ``fid``: FID/KID through torch-fidelity when it and its Inception weights are available locally
  (nothing is downloaded at run time); otherwise the result says why it was skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

UtilityFn = Callable[..., dict]
_REGISTRY: dict[str, UtilityFn] = {}


def register(name: str):
    def deco(fn: UtilityFn) -> UtilityFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


@register("heldout_loss")
def heldout_loss(ctx, cfg) -> dict:
    from dpdiff.probes.context import denoising_losses, encode_captions, encode_images, shared_noises

    ids = list(ctx.nonmember_records)[: int(cfg.get("heldout_images", 256))]
    if not ids:
        return {"skipped": "no held-out images"}
    recs = [ctx.records[i] for i in ids]
    lat = encode_images(ctx, recs)
    txt = encode_captions(ctx, [r.text for r in recs])
    ts = [int(t) for t in cfg.get("timesteps", [100, 300, 500, 700, 900])]
    noises = shared_noises(tuple(lat.shape[1:]), int(cfg.get("noise_draws", 2)), 4242)
    sched = ctx.base.noise_scheduler
    ft = denoising_losses(ctx.unet, sched, lat, txt, timesteps=ts, noises=noises, device=ctx.device)
    with ctx.base_model() as base_unet:
        base = denoising_losses(base_unet, sched, lat, txt, timesteps=ts, noises=noises, device=ctx.device)
    return {"heldout_loss": float(ft.mean()), "heldout_loss_base": float(base.mean()), "images": len(ids),
            "better_than_base": bool(ft.mean() < base.mean())}


_DIGIT_CLF = None


def digit_classifier():
    """An SVC on all of scikit-learn's real 8x8 digits (about 99% accurate on held-out digits)."""
    global _DIGIT_CLF
    if _DIGIT_CLF is None:
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        d = load_digits()
        _DIGIT_CLF = SVC(gamma=0.001, C=10.0).fit(d.data, d.target)
    return _DIGIT_CLF


def images_to_digit_features(images) -> np.ndarray:
    """Rendered (dark ink on white) RGB images -> the 8x8, 0..16 ink features of the digits set."""
    from PIL import Image

    feats = []
    for im in images:
        g = np.asarray(im.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
        feats.append((1.0 - g / 255.0) * 16.0)
    return np.stack(feats).reshape(len(feats), 64)


@register("digit_accuracy")
def digit_accuracy(ctx, cfg) -> dict:
    if not getattr(ctx, "builtin_demo", False):
        return {"skipped": "only for the built-in digits demo"}
    from dpdiff.data.digits import PRIVATE_DIGITS, PUBLIC_DIGITS, caption
    from dpdiff.models.pipeline import generate

    per = int(cfg.get("per_digit", 20))
    digits = list(PUBLIC_DIGITS + PRIVATE_DIGITS)
    prompts = [caption(d) for d in digits for _ in range(per)]
    seeds = [10_000 + i for i in range(len(prompts))]
    pipe = ctx.pipeline()
    out = {}
    for label, unet_ctx in (("finetuned", None), ("base", ctx.base_model)):
        if unet_ctx is None:
            imgs = generate(pipe, prompts, seeds=seeds, steps=int(cfg.get("steps", 20)),
                            guidance_scale=float(cfg.get("guidance_scale", 3.0)))
        else:
            with unet_ctx() as base_unet:
                pipe.unet = base_unet
                imgs = generate(pipe, prompts, seeds=seeds, steps=int(cfg.get("steps", 20)),
                                guidance_scale=float(cfg.get("guidance_scale", 3.0)))
                pipe.unet = ctx.unet
        pred = digit_classifier().predict(images_to_digit_features(imgs))
        truth = np.repeat(digits, per)
        per_digit = {str(d): float((pred[truth == d] == d).mean()) for d in digits}
        out[label] = {
            "private_digits_accuracy": float(np.mean([per_digit[str(d)] for d in PRIVATE_DIGITS])),
            "public_digits_accuracy": float(np.mean([per_digit[str(d)] for d in PUBLIC_DIGITS])),
            "per_digit": per_digit,
        }
    out["images_per_digit"] = per
    out["note"] = "accuracy of an SVC trained on real digits, on images generated from 'a handwritten digit k'"
    return out


@register("fid")
def fid(ctx, cfg) -> dict:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return {"skipped": "torch-fidelity is not installed (pip install 'dpdiff[fid]')"}
    weights = cfg.get("inception_weights") or os.environ.get("DPDIFF_INCEPTION_WEIGHTS")
    if not weights or not os.path.exists(str(weights)):
        return {"skipped": "no local Inception weights (set eval.inception_weights=PATH to "
                           "weights-inception-2015-12-05-6726825d.pth); nothing is downloaded"}
    import tempfile

    import torch_fidelity

    from dpdiff.models.pipeline import generate

    ids = list(ctx.nonmember_records) or list(ctx.member_records)
    n = min(int(cfg.get("fid_images", 500)), len(ids))
    recs = [ctx.records[i] for i in ids[:n]]
    imgs = generate(ctx.pipeline(), [r.text for r in recs], seeds=list(range(n)))
    with tempfile.TemporaryDirectory() as tmp:
        real, fake = os.path.join(tmp, "real"), os.path.join(tmp, "fake")
        os.makedirs(real)
        os.makedirs(fake)
        for i, (r, g) in enumerate(zip(recs, imgs)):
            r.open().convert("RGB").resize(g.size).save(os.path.join(real, f"{i}.png"))
            g.save(os.path.join(fake, f"{i}.png"))
        m = torch_fidelity.calculate_metrics(input1=fake, input2=real, fid=True, kid=True,
                                             cuda=torch.cuda.is_available(),
                                             verbose=False, feature_extractor_weights_path=str(weights),
                                             kid_subset_size=min(n, 100))
    return {"fid": float(m["frechet_inception_distance"]), "kid": float(m["kernel_inception_distance_mean"]),
            "images": n, "reference": "held-out images" if ctx.nonmember_records else "training images"}


def run_utility(ctx, cfg) -> dict:
    names = cfg.get("metrics") or ["heldout_loss", "digit_accuracy", "fid"]
    out = {}
    for name in names:
        if name not in _REGISTRY:
            from dpdiff.errors import UserError

            raise UserError(f"eval.metrics: unknown metric {name!r}; available: {', '.join(available())}")
        with torch.no_grad():
            out[name] = _REGISTRY[name](ctx, cfg)
    return out
