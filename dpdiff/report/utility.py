"""Utility metrics of a trained model, pluggable (a name -> function registry).

* ``heldout_loss``: the denoising loss on held-out (never trained) images, fine-tuned vs base,
  over fixed timesteps and shared noise draws. It reads held-out private images: named in the
  report's caveats.
* ``digit_accuracy`` (built-in demos only): a digit x style classifier labels images generated from the
  demo's captions (right digit, in the private look?) and from the base's own prompts (retention).
* ``fid``: FID/KID through torch-fidelity when it and its Inception weights are available locally
  (nothing is downloaded at run time); otherwise the result says why it was skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from dpdiff.schema import required

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
    from dpdiff.probes.context import record_losses

    ids = list(ctx.nonmember_records)[: int(required(cfg, "heldout_images"))]
    if not ids:
        return {"skipped": "no held-out images"}
    kw = dict(timesteps=required(cfg, "timesteps"), noise_draws=required(cfg, "noise_draws"))
    ft = record_losses(ctx, ids, **kw)["model"]
    with ctx.base_model() as base_model:  # for LoRA the same module with its adapter switched off: not at once
        base = record_losses(ctx, ids, models={"base": base_model}, **kw)["base"]
    return {"heldout_loss": float(ft.mean()), "heldout_loss_base": float(base.mean()), "images": len(ids),
            "better_than_base": bool(ft.mean() < base.mean())}


_STYLE_CLF = None
STYLES = ("handwritten", "printed")
CLASSIFIER_PRINTED_SEED = 2024  # disjoint from the printed demo's seed: these images never enter training


def digit_style_classifier():
    """An SVC over 20 classes, digit d in style s as 10*s + d: scikit-learn's 1,797 real handwritten digits
    (s=0) and 3,000 printed digits rendered from a seed the demo does not use (s=1). Cross-validated accuracy
    97.6% over the 20 classes; on fresh printed digits: 100% digit, 99% style."""
    global _STYLE_CLF
    if _STYLE_CLF is None:
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        from dpdiff.data.printed import printed_set

        hand = load_digits()
        printed, labels = printed_set(range(10), 300, CLASSIFIER_PRINTED_SEED)
        x = np.concatenate([hand.data, printed.reshape(len(printed), 64)])
        y = np.concatenate([hand.target, labels + 10])
        _STYLE_CLF = SVC(gamma=0.001, C=10.0).fit(x, y)
    return _STYLE_CLF


def images_to_digit_features(images) -> np.ndarray:
    """Rendered (dark ink on white) RGB images -> the 8x8, 0..16 ink features of the digits set."""
    from PIL import Image

    feats = []
    for im in images:
        g = np.asarray(im.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
        feats.append((1.0 - g / 255.0) * 16.0)
    return np.stack(feats).reshape(len(feats), 64)


def classify_digits(images) -> tuple[np.ndarray, np.ndarray]:
    """(digit, style index) of each generated image."""
    pred = digit_style_classifier().predict(images_to_digit_features(images))
    return pred % 10, pred // 10


def _score(images, digits: list[int], per: int, style: str) -> dict:
    digit, sty = classify_digits(images)
    truth = np.repeat(digits, per)
    want = STYLES.index(style)
    per_digit = {str(d): {"digit": float((digit[truth == d] == d).mean()),
                          "in_style": float((sty[truth == d] == want).mean()),
                          "both": float(((digit == d) & (sty == want))[truth == d].mean())} for d in digits}
    return {"accuracy_in_style": float(np.mean([v["both"] for v in per_digit.values()])),
            "prompt_accuracy": float(np.mean([v["digit"] for v in per_digit.values()])),
            "style_rate": float(np.mean([v["in_style"] for v in per_digit.values()])),
            "per_digit": per_digit}


@register("digit_accuracy")
def digit_accuracy(ctx, cfg) -> dict:
    """The built-in demos' utility: does the model draw the requested digit in the private look, and does it
    still draw what the base drew?

    * ``accuracy_in_style`` (the headline): generated from the demo's captions, the fraction classified as
      the requested digit AND in the private images' style (printed or handwritten);
    * ``prompt_accuracy``: the requested digit in any style; ``style_rate``: the private style in any digit;
    * ``retention_accuracy``: from the base's own prompts ("a handwritten digit k" for the digits it was
      pretrained on), the fraction classified as digit k (what the base knew, kept);
      ``retention_style_rate``: the fraction of those still in the base's handwritten look.
    """
    demo_name = getattr(ctx, "demo", None)
    if not demo_name:
        return {"skipped": "only for the built-in demos"}
    from dpdiff.data.demos import get_demo
    from dpdiff.models.pipeline import generate

    demo = get_demo(demo_name)
    per = int(required(cfg, "per_digit"))
    steps, gs = int(required(cfg, "steps")), float(required(cfg, "guidance_scale"))
    prompts = [demo.caption(d) for d in demo.digits for _ in range(per)]
    keep = [demo.retention_prompt(d) for d in demo.retention_digits for _ in range(per)]
    seeds = [10_000 + i for i in range(max(len(prompts), len(keep)))]
    pipe = ctx.pipeline()
    out = {}

    def measure(p, prompts=prompts) -> dict:
        res = _score(generate(p, prompts, seeds=seeds[:len(prompts)], steps=steps, guidance_scale=gs),
                     list(demo.digits), per, demo.style)
        kept = _score(generate(p, keep, seeds=seeds[:len(keep)], steps=steps, guidance_scale=gs),
                      list(demo.retention_digits), per, "handwritten")
        res["retention_accuracy"] = kept["prompt_accuracy"]
        res["retention_style_rate"] = kept["style_rate"]
        return res

    out["finetuned"] = measure(pipe, [ctx.prompt(c) for c in prompts])  # an embedding adapter's token included
    with ctx.base_model() as base_model:
        pipe.denoiser = base_model
        out["base"] = measure(pipe)  # the base's plain captions
        pipe.denoiser = ctx.denoiser
    out["demo"] = demo.name
    out["private_style"] = demo.style
    out["images_per_digit"] = per
    out["note"] = ("an SVC over digit x style (scikit-learn's handwritten digits and printed digits from fonts) "
                   "labels images generated from the demo's captions and from the base's own prompts")
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
    n = min(int(required(cfg, "fid_images")), len(ids))
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


def check_metric_names(cfg) -> list[str]:
    """The metrics ``eval.metrics`` names (default: all three), each one that exists; called before private data
    is read, so a typo costs no training."""
    names = list(cfg.get("metrics") or ["heldout_loss", "digit_accuracy", "fid"])
    for name in names:
        if name not in _REGISTRY:
            from dpdiff.errors import UserError

            raise UserError(f"eval.metrics: unknown metric {name!r}; available: {', '.join(available())}")
    return names


def run_utility(ctx, cfg) -> dict:
    names = check_metric_names(cfg)
    out = {}
    for name in names:
        with torch.no_grad():
            out[name] = _REGISTRY[name](ctx, cfg)
    return out
