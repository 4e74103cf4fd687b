"""A private embedding adapter: one new token for a concept or a look, learned from private images.

Textual inversion (Gal et al. 2022; diffusers' ``examples/textual_inversion/textual_inversion.py``) learns the
input embedding of a new token so that prompts with the token reproduce the training images; the denoiser and
the text encoder stay frozen. It trains D weights (768 for SD 1.5's CLIP, 64 for the tiny base) instead of a
LoRA's tens of thousands, so at a fixed noise multiplier the noise norm of the released vector is sqrt(D)
times smaller: the regime of tens to hundreds of private images, where DP-LoRA learns nothing.

Two mechanisms, both through the run's privacy plan, the same Poisson sampler, the same clipping engine
(``DPSGDEngine.add_unit_vectors``: clip to C, sum, one Gaussian draw, divide by q*N) and the same ledger:

* ``dpsgd``: DP-SGD on the token embedding alone. Each unit's gradient with respect to the shared vector v is
  computed exactly by giving every unit of the micro-batch its *own copy* of v (its own token id in the
  prompt): the gradient of the batch's summed loss with respect to copy u is unit u's gradient, because no
  layer of the text encoder or the denoiser mixes rows. No per-layer hooks are needed (D weights).
* ``aggregate``: the noisy aggregation of per-unit embeddings (DPAgg-TI, arXiv 2411.14639): every unit learns
  its own embedding by textual inversion on its own images (``unit_steps`` Adam steps, from the public
  initialisation e0), the offsets e_u - e0 are clipped to C and summed, one Gaussian draw N(0, sigma^2 C^2) is
  added, and v = e0 + (sum + noise) / N. That is one step of DP-SGD with sample rate 1 (every unit included
  once, add/remove sensitivity C; N is the public normalisation the DP-SGD step uses too), and is accounted as
  exactly that: a ``MechanismSegment(sigma, q=1, steps=1)`` of the run's ledger, composable with DP-LoRA runs on
  the same data in the dataset ledger. Units are optimised side by side in fixed-size chunks, each with its own
  copy and its own Adam state (Adam is elementwise): unit u's embedding is a function of unit u's rows alone.

Rows (images, flips, timesteps, diffusion noise) come from ``RowBuilder``: drawn from each unit's own stream.
The learned vector is saved in diffusers' textual-inversion format (``pipe.load_textual_inversion``).
Supported for the SD 1.x/2.x family (one CLIP text encoder); SDXL's two encoders, SD3 and Flux are refused.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from dpdiff.errors import UserError
from dpdiff.settings import EMBEDDING_MECHANISMS, EmbeddingSettings
from dpdiff.training.loss import RowBatch
from dpdiff.training.trainer import Trainer

log = logging.getLogger("dpdiff")

class SlotEmbedding(nn.Module):
    """The text encoder's token embedding with learned rows after the vocabulary: ids below ``first_id`` read the
    frozen table, id ``first_id + j`` reads ``vectors[j]`` (a tensor set by the caller, with grad)."""

    def __init__(self, base: nn.Embedding, first_id: int):
        super().__init__()
        self.base, self.first_id = base, int(first_id)
        self.vectors: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_id
        out = self.base(torch.where(new, torch.zeros_like(ids), ids))
        if bool(new.any()):
            if self.vectors is None:
                raise RuntimeError("a prompt holds the learned token but no vector is set")
            slot = (ids - self.first_id).clamp(0, len(self.vectors) - 1)
            out = torch.where(new.unsqueeze(-1), self.vectors[slot].to(out.dtype), out)
        return out


class ConceptToken:
    """The learned token installed in a base pipeline's tokenizer and text encoder (SD 1.x/2.x)."""

    def __init__(self, pipe, family, settings: EmbeddingSettings):
        if not family.single_clip_text:
            raise UserError(f"adapter=embedding supports the SD 1.x/2.x family (one CLIP text encoder); this base is "
                            f"{family.name}: use adapter=lora")
        s = settings
        if "{token}" not in s.template or "{caption}" not in s.template:
            raise UserError(f"adapter.template must hold {{token}} and {{caption}}, got {s.template!r}")
        tok, te = pipe.tokenizer, pipe.text_encoder
        vocab = tok.get_vocab()
        if s.token in vocab or f"{s.token}</w>" in vocab:  # CLIP's BPE marks a word's end with </w>
            raise UserError(f"adapter.token {s.token!r} is already a token of the base's tokenizer; pick a new one "
                            "(e.g. <my-look>)")
        init = tok(s.init_word, add_special_tokens=False).input_ids
        if len(init) != 1:
            raise UserError(f"adapter.init_word {s.init_word!r} is {len(init)} tokens for this tokenizer; pick a word "
                            "that is one token (e.g. style, photo, object)")
        emb = te.get_input_embeddings()
        if isinstance(emb, SlotEmbedding):
            raise RuntimeError("this pipeline holds a learned token already; load a fresh base for another")
        self.init = emb.weight[init[0]].detach().float().cpu().clone()  # public: a word of the base's vocabulary
        tok.add_tokens([s.token])
        self.token_id = int(tok.convert_tokens_to_ids(s.token))
        if self.token_id < emb.num_embeddings:
            raise RuntimeError(f"the new token's id {self.token_id} falls inside the embedding table")
        self.slots = SlotEmbedding(emb, first_id=self.token_id)
        te.set_input_embeddings(self.slots)
        self.pipe, self.settings = pipe, s
        self._ids: dict[str, torch.Tensor] = {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        """Token ids of the templated prompts [R, T] (cached per caption). A prompt whose token the tokenizer cut
        off (a long caption) is refused: that unit would get no gradient and no say."""
        tok = self.pipe.tokenizer
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            enc = tok([self.settings.prompt(c) for c in missing], padding="max_length",
                      max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            for c, row in zip(missing, enc):
                if not bool((row == self.token_id).any()):
                    raise UserError(f"a caption is too long for the template {self.settings.template!r}: the token "
                                    f"was cut at {tok.model_max_length} tokens; shorten the captions or the template")
                self._ids[c] = row
        return torch.stack([self._ids[c] for c in captions])

    def encode(self, captions: list[str], *, slots: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``encoder_hidden_states`` [R, T, D] of the templated prompts, row r's token reading ``vectors[slots[r]]``
        (differentiable with respect to ``vectors``)."""
        te = self.pipe.text_encoder
        ids = self.ids(captions)
        ids = torch.where(ids == self.token_id, self.token_id + slots.view(-1, 1).cpu(), ids).to(te.device)
        self.slots.vectors = vectors
        try:
            return te(ids)[0]
        finally:
            self.slots.vectors = None

    def use(self, vector: torch.Tensor) -> None:
        """Install the learned vector for inference: the pipeline's own prompts with the token read it."""
        self.slots.vectors = vector.detach().reshape(1, -1).to(self.pipe.text_encoder.device)

    def save(self, vector: torch.Tensor, out_dir: Path) -> Path:
        """diffusers' textual-inversion file (``{token: [D]}``, safetensors): ``pipe.load_textual_inversion(path)``."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "learned_embeds.safetensors"
        save_file({self.settings.token: vector.detach().float().cpu().contiguous()}, str(path))
        return path


class ConceptTrainer(Trainer):
    """The shared training loop (sampler, engine, ledger, logging) with per-unit vectors computed here."""

    def __init__(self, *, concept: ConceptToken, vector: nn.Parameter, captions, mechanism: str,
                 unit_steps: int, unit_lr: float, **kw):
        super().__init__(params=[vector], **kw)
        if mechanism not in EMBEDDING_MECHANISMS:
            raise UserError(f"adapter.mechanism must be one of {', '.join(EMBEDDING_MECHANISMS)}, got {mechanism!r}")
        self.concept, self.vector, self.captions = concept, vector, captions
        self.mechanism, self.unit_steps, self.unit_lr = mechanism, int(unit_steps), float(unit_lr)
        self.init = concept.init.to(vector.device)

    def _row_captions(self, rows: RowBatch) -> list[str]:
        return [self.captions[int(i)] for i in rows.caption]

    def _losses(self, rows: RowBatch, copies: torch.Tensor) -> torch.Tensor:
        """Per-row losses with row r's token reading ``copies[unit_pos[r]]``."""
        rows = rows.to(self.device)
        hidden = self.concept.encode(self._row_captions(rows), slots=rows.unit_pos, vectors=copies)
        return self.objective.row_losses(self.denoiser, replace(rows, encoder_hidden_states=hidden)).float()

    def unit_gradients(self, rows: RowBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([units, D] each unit's gradient of its mean loss at the current vector, the row losses)."""
        copies = self.vector.detach().float().expand(rows.num_units, -1).clone().requires_grad_(True)
        loss = self._losses(rows, copies)
        (loss * rows.row_weight.to(loss.device)).sum().backward()
        return copies.grad, loss.detach()

    def unit_embeddings(self, unit_ids: list[int], *, chunk: int) -> torch.Tensor:
        """Each unit's own textual-inversion embedding [len(unit_ids), D], ``unit_steps`` Adam steps from e0 on its
        own rows. Units go side by side in chunks of exactly ``chunk`` (the last padded with repeats of its first
        unit, their results dropped): each copy's update reads only its own unit's loss."""
        out = []
        for start in range(0, len(unit_ids), chunk):
            part = list(unit_ids[start : start + chunk])
            real = len(part)
            part += [part[0]] * (chunk - real)
            copies = self.init.expand(len(part), -1).clone().requires_grad_(True)
            opt = torch.optim.Adam([copies], lr=self.unit_lr)
            for s in range(self.unit_steps):
                rows = self.row_builder.build(part, step=s)
                loss = self._losses(rows, copies)
                opt.zero_grad(set_to_none=True)
                (loss * rows.row_weight.to(loss.device)).sum().backward()
                opt.step()
            out.append(copies.detach()[:real])
        return torch.cat(out) if out else torch.zeros(0, self.init.numel())

    def _micro_step(self, rows: RowBatch) -> None:
        grads, loss = self.unit_gradients(rows)
        self.engine.add_unit_vectors(grads, row_loss=loss)

    def train_step(self) -> dict:
        if self.mechanism == "dpsgd":
            return super().train_step()
        # aggregate: one release, every unit once (q = 1), v = e0 + (sum of clipped offsets + noise) / N
        units = self.sampler.sample()
        self.engine.start_step()
        if units:
            emb = self.unit_embeddings(units, chunk=self.micro_batch_size)
            self.engine.add_unit_vectors(emb - self.init.to(emb.device))
        stats = self.engine.finalize()
        with torch.no_grad():
            self.vector.copy_(self.init.to(self.vector.device) + self.vector.grad.float())
        self.vector.grad = None
        self.last_lr = 1.0
        self.privacy.record_step()
        self.step += 1
        return stats

    def _check_weights_changed(self, before: list[torch.Tensor]) -> None:
        if torch.equal(before[0], self.vector.detach()):
            raise RuntimeError("the learned embedding did not change after the first step")

    def checkpoint(self) -> Path | None:
        """No resumable checkpoint for the embedding adapter (a run is minutes): the ledger is saved."""
        if self.is_main:
            self.privacy.save_ledger()
        return None
