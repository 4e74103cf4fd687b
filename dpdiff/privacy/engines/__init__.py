"""The per-unit clipping engines, one file each, and the registry that picks one by name (as Opacus'
``get_gsm_class`` picks a grad-sample module by its mode):

* ``hooks`` (``hooks.py``, ``DPSGDEngine``): per-unit gradients of every trainable weight materialised in the
  backward (LoRA); also the base of the others (clip, sum, one noise draw, normalisation: ``finalize``), and,
  built with ``hooks=False``, the engine of callers that compute each unit's vector themselves
  (``add_unit_vectors``: the embedding adapter);
* ``bookkeeping`` (``bookkeeping.py``, on the ghost-norm layer machinery of ``ghost.py``): one backward, per
  layer the cheaper of ghost norms and instantiated per-unit gradients (full fine-tuning);
* ``none`` (``nonprivate.py``): the plain mean gradient of a non-private baseline.

Observers (the SNR statistics' parameter groups, the gradient-canary audit) are passed at construction."""

from __future__ import annotations

from dpdiff.privacy.engines.bookkeeping import BookKeepingDPSGDEngine
from dpdiff.privacy.engines.hooks import DPSGDEngine, expected_noise_std
from dpdiff.privacy.engines.nonprivate import NonPrivateEngine

#: name -> the engine class ``train.per_sample`` (or ``auto``'s choice) selects
ENGINE_CLASSES = {"hooks": DPSGDEngine, "bookkeeping": BookKeepingDPSGDEngine}


def get_engine_class(name: str) -> type[DPSGDEngine]:
    try:
        return ENGINE_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown clipping engine {name!r} (known: {', '.join(ENGINE_CLASSES)})") from None


__all__ = ["ENGINE_CLASSES", "BookKeepingDPSGDEngine", "DPSGDEngine", "NonPrivateEngine", "expected_noise_std",
           "get_engine_class"]
