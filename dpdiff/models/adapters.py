"""What is trained in the UNet: LoRA adapters (peft), all weights, or attention projections only.

LoRA follows diffusers' ``train_text_to_image_lora.py``: ``unet.add_adapter(LoraConfig(...,
init_lora_weights="gaussian"))`` on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and saving through
``StableDiffusionPipeline.save_lora_weights`` in diffusers' format, so that
``pipe.load_lora_weights(run_dir / "lora")`` works. The adapter metadata (rank, alpha, targets)
is saved with the weights, so a loaded LoRA has the scale it was trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpdiff.errors import UserError

KINDS = ("lora", "full", "attn")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(unet: nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in unet.named_modules()]
    for t in targets:
        hits = [n for n in names if _matches(n, t)]
        if not hits:
            known = sorted({n.split(".")[-1] if not n.endswith(".0") else ".".join(n.split(".")[-2:])
                            for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
            raise UserError(f"adapter.target_modules: {t!r} matches no module of the UNet; "
                            f"linear/conv module names include {', '.join(known[:12])}")
        bad = [n for n in hits if not isinstance(unet.get_submodule(n), (nn.Linear, nn.Conv2d))]
        if bad:
            raise UserError(f"adapter.target_modules: {t!r} matches {bad[0]}, which is not a Linear or Conv2d layer")


def attach(unet: nn.Module, *, kind: str, rank: int = 16, alpha: float | None = None,
           target_modules: list[str] | None = None, dropout: float = 0.0) -> list[nn.Parameter]:
    """Make the chosen part of ``unet`` trainable (in place) and return the trainable parameters.

    Move the UNet to its device *before* calling this (peft #3409 / opacus #820: moving after
    wrapping can leave the optimizer on stale LoRA tensors that never change).
    """
    unet.requires_grad_(False)
    if kind == "lora":
        from peft import LoraConfig

        if rank < 1:
            raise UserError(f"adapter.rank must be >= 1, got {rank}")
        targets = list(target_modules or ["to_q", "to_k", "to_v", "to_out.0"])
        check_targets(unet, targets)
        cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                         init_lora_weights="gaussian", target_modules=targets, lora_dropout=float(dropout))
        unet.add_adapter(cfg)
    elif kind == "full":
        unet.requires_grad_(True)
    elif kind == "attn":
        targets = list(target_modules or ["to_q", "to_k", "to_v", "to_out.0"])
        check_targets(unet, targets)
        for name, module in unet.named_modules():
            if any(_matches(name, t) for t in targets):
                module.requires_grad_(True)
    else:
        raise UserError(f"adapter must be one of {', '.join(KINDS)}, got {kind!r}")
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights, their grads and the noise live in fp32
    return params


def save(unet: nn.Module, *, kind: str, out_dir: Path, family=None) -> Path:
    """Save what was trained: ``lora/pytorch_lora_weights.safetensors`` or the denoiser's folder (``unet/``,
    ``transformer/``), as the family's diffusers training script saves it, so that the family's pipeline
    (``StableDiffusion[XL|3]Pipeline``, ``FluxPipeline``) loads it with ``load_lora_weights`` /
    ``from_pretrained``."""
    import diffusers

    from dpdiff.models.families import FAMILIES

    family = family or FAMILIES["sd"]
    out_dir = Path(out_dir)
    if kind == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet)
        if family.denoiser == "unet":  # the SD/SDXL scripts convert to diffusers' names; SD3/Flux's save peft's
            state = convert_state_dict_to_diffusers(state)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        meta = unet.peft_config["default"].to_dict()
        pipeline = getattr(diffusers, family.pipeline)
        pipeline.save_lora_weights(out_dir / "lora", safe_serialization=True,
                                   **{f"{family.denoiser}_lora_layers": state,
                                      f"{family.denoiser}_lora_adapter_metadata": meta})
        return out_dir / "lora"
    unet.save_pretrained(out_dir / family.denoiser, safe_serialization=True)
    return out_dir / family.denoiser


def parameter_groups(unet: nn.Module, params: list[nn.Parameter]) -> dict[str, list[int]]:
    """Indices of ``params`` by the part of the UNet they belong to (self-attention, cross-attention,
    resnets, ...), for per-group statistics."""
    index = {id(p): i for i, p in enumerate(params)}
    groups: dict[str, list[int]] = {}
    for name, p in unet.named_parameters():
        if id(p) not in index:
            continue
        if ".attn1." in name:
            g = "self-attention"
        elif ".attn2." in name:
            g = "cross-attention"
        elif ".resnets." in name:
            g = "resnets"
        elif ".attentions." in name:
            g = "attention blocks (other)"
        else:
            g = name.split(".")[0]
        groups.setdefault(g, []).append(index[id(p)])
    return groups


def trainable_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (for checkpoints and EMA)."""
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def count_trainable(*, pretrained: str | None, kind: str, rank: int | None, target_modules: list[str] | None) -> int:
    """Trainable weights of an adapter on a pipeline's denoiser, counted on an empty (meta) one: no weights read.
    ``target_modules=None`` is the family's default."""
    import json
    from pathlib import Path

    import diffusers
    from accelerate import init_empty_weights
    from torch import nn

    from dpdiff.models.families import detect_family
    from dpdiff.models.loading import resolve_pretrained

    root = Path(resolve_pretrained(pretrained, allow_download=False))
    family = detect_family(root)
    if kind == "embedding":  # one token's input embedding: the text encoder's width (SD 1.x/2.x)
        if not family.single_clip_text:
            from dpdiff.errors import UserError

            raise UserError(f"adapter=embedding supports the SD 1.x/2.x family; this base is {family.name}")
        return int(json.loads((root / "text_encoder" / "config.json").read_text())["hidden_size"])
    cls = json.loads((root / "model_index.json").read_text())[family.denoiser][1]
    with init_empty_weights():
        unet = getattr(diffusers, cls).from_config(json.loads((root / family.denoiser / "config.json").read_text()))
    if kind == "full":
        return sum(p.numel() for p in unet.parameters())
    targets = list(target_modules or family.lora_targets)
    total = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if kind == "attn":
            total += sum(p.numel() for p in m.parameters(recurse=False))
        elif isinstance(m, nn.Linear):
            total += int(rank) * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total += int(rank) * (m.in_channels * k + m.out_channels)
    return total
