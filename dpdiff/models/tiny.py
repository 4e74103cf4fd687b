"""The built-in tiny Stable Diffusion: component configs and its small CLIP vocabulary.

The shipped pipeline (``dpdiff/assets/tiny-sd-digits``) is a real diffusers
``StableDiffusionPipeline`` directory at 32x32 pixels: an ``AutoencoderKL`` with a
downsampling factor of 4 (8x8x4 latents), a ``UNet2DConditionModel`` with cross-attention
at both resolutions, a ``CLIPTextModel`` and a ``CLIPTokenizer`` over a vocabulary of a
few hundred tokens. The configs follow the small models of diffusers' own UNet/VAE tests
(``block_out_channels=(32, 64)``-style), scaled up just enough to draw digits.
``recipes/pretrain_base.py`` trains it on the public half of scikit-learn's digits.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Whole-word tokens of the vocabulary. Anything else (user captions, random canary
# tokens) still tokenizes, letter by letter, because every single character is a token.
WORDS = (
    NUMBER_WORDS
    + ("a", "an", "the", "of", "handwritten", "digit", "number", "photo", "picture", "image")
    + ("drawing", "written", "by", "hand", "small", "large", "black", "white", "gray", "on")
    + ("background", "sample", "scan", "and", "in", "with", "person", "user", "texture")
    + ("random", "noise", "pattern", "canary", "style", "blurry", "thin", "thick", "bold")
)

MAX_TOKENS = 32  # tokenizer.model_max_length == text_encoder max_position_embeddings


def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """Return a CLIP BPE vocabulary and merge list covering ``WORDS`` plus single characters.

    CLIP's BPE splits a word into characters, marks the last one with ``</w>`` and applies
    merges by rank. One merge chain per word (``d i``, ``di g``, ...) rebuilds each word.
    """
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens: list[str] = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(chars) + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        if len(pieces) == 1:
            continue  # a one-letter word is already a character token
        current = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
            if current not in tokens:
                tokens.append(current)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges


def write_tokenizer(directory: Path) -> None:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config CLIPTokenizer loads."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def text_encoder_config(vocab_size: int) -> dict:
    """CLIPTextConfig kwargs: 2 layers of width 64, 32 positions."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )


def vae_config() -> dict:
    """AutoencoderKL kwargs: 32x32x3 pixels <-> 8x8x4 latents (factor 4)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def unet_config() -> dict:
    """UNet2DConditionModel kwargs: 8x8 latents, cross-attention at 8x8 and 4x4."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def scheduler_config() -> dict:
    """DDPMScheduler kwargs: Stable Diffusion 1.x's training schedule."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


# --- tiny random denoisers of the other families (tests and benchmarks; the sizes of diffusers' own tests) ---------

#: per family: (diffusers class, config, text tokens x width, added conditioning shapes per row)
FAMILY_DENOISERS = {
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64), (16, 64), {"text_embeds": (32,), "time_ids": (6,)}),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16), (16, 32), {"pooled_projections": (64,)}),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        (16, 32), {"pooled_projections": (32,)}),
}


def family_denoiser(family: str, *, seed: int = 0, **overrides):
    """A tiny random denoiser of ``family`` (sdxl, sd3, flux) for 4x8x8 latents; ``overrides`` change its config
    (e.g. ``qk_norm="rms_norm"`` for an SD3.5-style transformer)."""
    import diffusers
    import torch

    cls, cfg, _, _ = FAMILY_DENOISERS[family]
    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**{**cfg, **overrides})


def family_conditioning(family: str, rows: int, *, generator):
    """Random text embeddings [rows, T, D] and added conditioning of the right shapes for a tiny ``family`` model.
    SDXL's time ids are real ones: (original size, crop top-left, target size) of a 32 px image."""
    import torch

    _, _, (tokens, width), added = FAMILY_DENOISERS[family]
    text = torch.randn(rows, tokens, width, generator=generator)
    cond = {k: torch.randn(rows, *shape, generator=generator) for k, shape in added.items()}
    if "time_ids" in cond:
        cond["time_ids"] = torch.tensor([32.0, 32.0, 0.0, 0.0, 32.0, 32.0]).repeat(rows, 1)
    return text, cond


def family_scheduler(family: str):
    """The training scheduler of a tiny ``family`` model: DDPM for SDXL, flow matching (shift 3, SD3's) else."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sdxl":
        return DDPMScheduler(**scheduler_config())
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


# --- tiny random pipelines of the other families, written to disk (tests: the recipe path per family) -------------

T5_MAX_TOKENS = 16  # the tiny T5 tokenizer's model_max_length (pipelines' max_sequence_length in the tests)


def t5_tokenizer():
    """A T5TokenizerFast over ``WORDS`` plus single characters, built offline with the ``tokenizers`` library
    (Unigram, SentencePiece's metaspace, ``</s>`` appended as T5 does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [("\u2581", -2.0)] + [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=T5_MAX_TOKENS)


def write_family_pipeline(family: str, directory: Path, *, seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (32 px,
    4x8x8 latents, the denoisers of ``FAMILY_DENOISERS``) with ``save_pretrained``, as a user's model dir is laid
    out. Text encoders: CLIP (with projection where the family pools it) and T5, of the widths the denoiser reads:
    SDXL 32+32 hidden -> cross-attention 64, pooled 32; SD3 16+16 CLIP hidden padded to T5's 32, pooled 32+32;
    Flux CLIP pooled 32 and T5 32. The flow families' VAEs carry a shift factor, as SD3's and Flux's do."""
    import diffusers
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    directory = Path(directory)
    tok_dir = directory.with_name(directory.name + ".clip-tokenizer")
    write_tokenizer(tok_dir)
    clip_tok = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)

    def clip(width: int, projection: bool):
        cfg = CLIPTextConfig(**{**text_encoder_config(len(clip_tok)), "hidden_size": width,
                                "intermediate_size": 2 * width, "projection_dim": 32})
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    def t5():
        tok = t5_tokenizer()
        return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0)), tok

    flow = family in ("sd3", "flux")
    vae = diffusers.AutoencoderKL(**vae_config(), **({"shift_factor": 0.1159, "scaling_factor": 1.5} if flow else {}))
    denoiser = family_denoiser(family, seed=seed)
    if family == "sdxl":
        parts = dict(unet=denoiser, text_encoder=clip(32, False), text_encoder_2=clip(32, True), tokenizer=clip_tok,
                     tokenizer_2=clip_tok, scheduler=diffusers.EulerDiscreteScheduler(
                         **{k: v for k, v in scheduler_config().items() if k != "clip_sample"}))
    elif family == "sd3":
        enc3, tok3 = t5()
        parts = dict(transformer=denoiser, text_encoder=clip(16, True), text_encoder_2=clip(16, True),
                     text_encoder_3=enc3, tokenizer=clip_tok, tokenizer_2=clip_tok, tokenizer_3=tok3,
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    elif family == "flux":
        enc2, tok2 = t5()
        parts = dict(transformer=denoiser, text_encoder=clip(32, False), text_encoder_2=enc2, tokenizer=clip_tok,
                     tokenizer_2=tok2, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                         num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256))
    else:
        raise ValueError(f"no tiny pipeline for family {family!r}")
    from dpdiff.models.families import FAMILIES

    pipe = getattr(diffusers, FAMILIES[family].pipeline)(vae=vae, **parts)
    pipe.save_pretrained(directory, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return directory
