"""The embedding adapter (dpdiff.training.concept): exact per-unit gradients, independent per-unit embeddings, the
diffusers textual-inversion file, and the clipping path it shares with the DP-SGD engine."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import write_image_folder

from dpdiff.data.formats import read_dataset
from dpdiff.data.records import PrivacyUnits
from dpdiff.errors import UserError
from dpdiff.models.families import FAMILIES
from dpdiff.models.loading import load_base
from dpdiff.paths import TINY_BASE_DIR
from dpdiff.privacy.engines import DPSGDEngine, NonPrivateEngine
from dpdiff.privacy.randomness import GaussianNoise
from dpdiff.schema import compose
from dpdiff.settings import EmbeddingSettings
from dpdiff.training.concept import ConceptToken, ConceptTrainer
from dpdiff.training.encode import encode_dataset
from dpdiff.training.loss import make_objective
from dpdiff.training.rows import RowBuilder

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), n=6, size=16)
    records = read_dataset(root)
    base = load_base(str(TINY_BASE_DIR))
    enc = encode_dataset(records, base=base, resolution=base.resolution, center_crop=True, flips=False,
                         device="cpu", progress=False)
    units = PrivacyUnits("user", ((0, 1), (2,), (3, 4, 5)), ("a", "b", "c"))
    rb = RowBuilder(enc, units, augmult=2, random_flip=False, num_train_timesteps=1000, key=KEY)
    concept = ConceptToken(base.pipe, FAMILIES["sd"], embedding())
    return SimpleNamespace(base=base, enc=enc, rb=rb, concept=concept, records=records)


# the shipped adapter=embedding keys (configs/adapter/embedding.yaml): the settings have no defaults of their own
_EMB = {k: v for k, v in compose(["adapter=embedding"]).adapter.items()}


def embedding(**kw) -> EmbeddingSettings:
    return EmbeddingSettings.from_config({**_EMB, **kw})


def _trainer(s, vector, *, mechanism="dpsgd", unit_steps=3, micro=3):
    return ConceptTrainer(concept=s.concept, vector=vector, captions=s.enc.captions, mechanism=mechanism,
                          unit_steps=unit_steps, unit_lr=0.05, denoiser=s.base.denoiser,
                          objective=make_objective(s.base.family, s.base.noise_scheduler), row_builder=s.rb,
                          sampler=None, engine=None, optimizer=None, lr_scheduler=None, max_steps=1,
                          micro_batch_size=micro, run_dir=".", tracker=None, device="cpu", privacy=None,
                          progress=False)


def test_unit_gradients_equal_a_per_unit_loop(setup):
    """Every unit's copy of v gets exactly that unit's gradient: checked against autograd on one vector per unit."""
    s = setup
    v = torch.nn.Parameter(s.concept.init.clone() + 0.01)
    tr = _trainer(s, v)
    rows = s.rb.build([0, 1, 2], step=3)
    grads, loss = tr.unit_gradients(rows)
    assert grads.shape == (3, v.numel()) and loss.shape == (len(rows),)
    for u in range(3):
        sel = (rows.unit_pos == u).nonzero().flatten()
        one = rows.select(sel, unit_pos=torch.zeros(len(sel), dtype=torch.long), num_units=1)
        w = v.detach().clone().requires_grad_(True)
        lu = tr._losses(one, w.view(1, -1))
        (lu * one.row_weight).sum().backward()
        assert torch.allclose(grads[u], w.grad, rtol=1e-4, atol=1e-7), u
        assert float(w.grad.norm()) > 0  # the token reaches the loss


def test_unit_embedding_depends_on_its_unit_alone(setup):
    """A unit's textual-inversion embedding is the same whichever other units share its chunk."""
    s = setup
    tr = _trainer(s, torch.nn.Parameter(s.concept.init.clone()), mechanism="aggregate", unit_steps=3, micro=2)
    a = tr.unit_embeddings([0, 1], chunk=2)
    b = tr.unit_embeddings([0, 2], chunk=2)
    alone = tr.unit_embeddings([0], chunk=2)  # padded with a repeat of unit 0
    assert torch.allclose(a[0], b[0], rtol=0, atol=1e-6) and torch.allclose(a[0], alone[0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0], s.concept.init) and not torch.allclose(a[0], a[1])


def test_saved_file_loads_with_diffusers_textual_inversion(setup, tmp_path):
    """The released vector in diffusers' format: a fresh pipeline's load_textual_inversion conditions a prompt with
    the token exactly as the trained path does."""
    s = setup
    vec = s.concept.init + 0.3 * torch.randn(s.concept.init.shape, generator=torch.Generator().manual_seed(0))
    path = s.concept.save(vec, tmp_path / "embedding")
    fresh = load_base(str(TINY_BASE_DIR)).pipe
    fresh.load_textual_inversion(str(path))
    prompt = s.concept.settings.prompt("a photo number 1")
    ids = fresh.tokenizer([prompt], padding="max_length", max_length=fresh.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = fresh.text_encoder(ids)[0]
        s.concept.use(vec)
        ours = s.base.pipe.text_encoder(ids)[0]
        s.concept.slots.vectors = None
        plain = s.base.pipe.text_encoder(s.base.pipe.tokenizer(["style style, a photo number 1"], padding="max_length",
                                         max_length=32, truncation=True, return_tensors="pt").input_ids)[0]
    assert torch.allclose(ref, ours, atol=1e-6)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the token reads the learned vector, not the init word


def test_settings_and_refusals(setup):
    pipe = load_base(str(TINY_BASE_DIR)).pipe
    with pytest.raises(UserError, match="SD 1.x/2.x"):
        ConceptToken(pipe, FAMILIES["sdxl"], embedding(token="<other>"))
    with pytest.raises(UserError, match="already a token"):
        ConceptToken(pipe, FAMILIES["sd"], embedding(token="digit"))
    with pytest.raises(UserError, match="one token"):
        ConceptToken(pipe, FAMILIES["sd"], embedding(token="<x2>", init_word="xyzzyplugh"))
    with pytest.raises(RuntimeError, match="already"):
        ConceptToken(setup.base.pipe, FAMILIES["sd"], embedding(token="<x3>"))
    with pytest.raises(UserError, match="template"):
        EmbeddingSettings.from_config({**_EMB, "template": "{caption} only"})
    with pytest.raises(UserError, match="mechanism"):
        EmbeddingSettings.from_config({**_EMB, "mechanism": "magic"})


def test_add_unit_vectors_clips_and_noises_like_the_hooks():
    """Caller-computed unit vectors are clipped to C and summed, noised once, divided by q*N (noise checked with
    sigma = 0 exactly, and its scale against N(0, (sigma C / qN)^2) at 6 sd: false failure < 1e-8)."""
    p = torch.nn.Parameter(torch.zeros(4000))
    vecs = torch.zeros(3, 4000)
    vecs[0, 0], vecs[1, 1], vecs[2, :2] = 5.0, 0.5, torch.tensor([3.0, 4.0])  # norms 5, 0.5, 5; C = 1
    eng = DPSGDEngine(torch.nn.Module(), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2.0,
                      noise=GaussianNoise.seeded(1), params=[p], hooks=False)
    eng.start_step()
    eng.add_unit_vectors(vecs)
    stats = eng.finalize()
    want = torch.zeros(4000)
    want[0], want[1] = (1.0 + 0.6) / 2, (0.5 + 0.8) / 2
    assert torch.allclose(p.grad, want) and stats["units"] == 3 and stats["clip_fraction"] == pytest.approx(2 / 3)
    with pytest.raises(RuntimeError, match="add_unit_vectors"):
        eng.start_step()
        eng.backward(torch.ones(1), unit_pos=torch.zeros(1, dtype=torch.long), row_weight=torch.ones(1), num_units=1)
    noisy = DPSGDEngine(torch.nn.Module(), noise_multiplier=2.0, max_grad_norm=1.0, expected_batch_size=2.0,
                        noise=GaussianNoise.seeded(3), params=[p], hooks=False)
    noisy.start_step()
    noisy.add_unit_vectors(torch.zeros(2, 4000))
    noisy.finalize()
    sd = float(p.grad.std())  # 4000 draws of N(0, 1): the sample sd is within 6 * 0.0112 of 1
    assert abs(sd - 1.0) < 6 / math.sqrt(2 * 4000)
    plain = NonPrivateEngine(torch.nn.Module(), params=[p])
    plain.start_step()
    plain.add_unit_vectors(vecs)
    plain.finalize()
    assert torch.allclose(p.grad, vecs.mean(0))
