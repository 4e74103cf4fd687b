"""bf16 autocast keeps per-unit norms close to fp32; cached latents give the on-the-fly loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import make_tiny_lora_unet

from dpdiff.privacy.engines import DPSGDEngine
from dpdiff.privacy.randomness import GaussianNoise
from dpdiff.training.loss import DiffusionObjective, RowBatch


def _objective():
    from diffusers import DDPMScheduler

    from dpdiff.models import tiny

    return DiffusionObjective(DDPMScheduler(**tiny.scheduler_config()))


def _rows(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RowBatch(torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g),
                    torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 32, 64, generator=g),
                    torch.arange(n), torch.ones(n), n)


def _norms(model, rows, autocast):
    params = [p for p in model.parameters() if p.requires_grad]
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=1.0,
                      noise=GaussianNoise.seeded(0), params=params)
    eng.start_step()
    obj = _objective()
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = obj.row_losses(model, rows)
    else:
        loss = obj.row_losses(model, rows)
    eng.backward(loss.float(), unit_pos=rows.unit_pos, row_weight=rows.row_weight, num_units=rows.num_units)
    stats = eng.finalize()
    grads = torch.cat([p.grad.flatten() for p in params])
    assert all(p.grad.dtype == torch.float32 for p in params)  # the privatised gradient stays fp32
    eng.close()
    return torch.tensor(eng.stats.norms), grads, stats


def test_bf16_dp_step_norms_match_fp32():
    model = make_tiny_lora_unet(rank=4)
    rows = _rows()
    n32, g32, _ = _norms(copy.deepcopy(model), rows, autocast=False)
    n16, g16, _ = _norms(copy.deepcopy(model), rows, autocast=True)
    torch.testing.assert_close(n16, n32, rtol=0.05, atol=0)
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.99


def test_cached_posterior_gives_the_on_the_fly_loss():
    """Rows from cached VAE posteriors equal encoding the pixels on the fly with the same draw."""
    from dpdiff.data.demos import builtin_digits_dir
    from dpdiff.data.formats import read_dataset
    from dpdiff.data.preprocess import to_pixels
    from dpdiff.data.records import PrivacyUnits
    from dpdiff.models.loading import load_base
    from dpdiff.training.encode import encode_dataset
    from dpdiff.training.rows import RowBuilder

    base = load_base(None)
    recs = read_dataset(builtin_digits_dir())[:6]
    enc = encode_dataset(recs, base=base,
                         resolution=32, center_crop=True, flips=False, device="cpu", progress=False)
    units = PrivacyUnits("example", tuple((i,) for i in range(6)), tuple(r.key for r in recs))
    builder = RowBuilder(enc, units, augmult=1, random_flip=False, num_train_timesteps=1000, key=bytes(32))
    rows = builder.build([0, 1, 2, 3, 4, 5], step=0)
    # replay the same draws on the fly: each unit's stream gives its latent eps first (RowBuilder's order)
    px = torch.stack([to_pixels(r.open(), resolution=32) for r in recs])
    with torch.no_grad():
        post = base.vae.encode(px).latent_dist
    eps = torch.stack([torch.from_numpy(builder.stream(u, 0).standard_normal(tuple(post.mean.shape[1:]),
                                                                             dtype=np.float32)) for u in range(6)])
    lat = (post.mean + post.std * eps) * base.vae.config.scaling_factor
    torch.testing.assert_close(rows.latents, lat, rtol=1e-5, atol=1e-5)
    obj = DiffusionObjective(base.noise_scheduler)
    with torch.no_grad():
        cached = obj.row_losses(base.denoiser, rows)
        fly = obj.row_losses(base.denoiser, RowBatch(lat, rows.noise, rows.timesteps, rows.encoder_hidden_states,
                                                 rows.unit_pos, rows.row_weight, rows.num_units))
    torch.testing.assert_close(cached, fly, rtol=1e-4, atol=1e-6)


def test_feature_cache_roundtrip_is_user_only(tmp_path):
    import os
    import stat

    from dpdiff.training.encode import EncodedData, load_encoded, save_encoded

    d = EncodedData(torch.randn(3, 1, 4, 2, 2), torch.rand(3, 1, 4, 2, 2), torch.randn(2, 5, 8),
                    torch.tensor([0, 1, 1]), ["a", "b"], 0.5, 0.0)
    p = tmp_path / "cache" / "f.safetensors"
    save_encoded(d, p)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(p.parent).st_mode) == 0o700
    e = load_encoded(p)
    assert e.captions == ["a", "b"] and e.scaling_factor == pytest.approx(0.5)
    torch.testing.assert_close(e.latent_mean, d.latent_mean)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_feature_store_is_memory_mapped_and_rounded_once(tmp_path, dtype):
    """The cache keeps the features at the storage dtype, memory-mapped (no copy until indexed); rows gathered
    from it are float32 and equal the features rounded to that dtype."""
    from dpdiff.training.encode import FEATURE_DTYPES, EncodedData, load_encoded, save_encoded

    g = torch.Generator().manual_seed(0)
    d = EncodedData(torch.randn(50, 2, 4, 3, 3, generator=g), torch.rand(50, 2, 4, 3, 3, generator=g),
                    torch.randn(7, 5, 8, generator=g), torch.arange(50) % 7, [f"c{i}" for i in range(7)], 0.18, 0.1,
                    text_added={"pooled": torch.randn(7, 6, generator=g)},
                    image_added={"time_ids": torch.randn(50, 2, 6, generator=g)})
    p = tmp_path / "f.safetensors"
    save_encoded(d, p, dtype=dtype)
    e = load_encoded(p)
    store = FEATURE_DTYPES[dtype]
    assert e.latent_mean.dtype == store and e.text_emb.dtype == store and e.text_added["pooled"].dtype == store
    assert e.text_index.dtype == torch.long and e.image_added["time_ids"].dtype == torch.float32
    torch.testing.assert_close(e.latent_mean, d.latent_mean.to(store))
    torch.testing.assert_close(e.text_added["pooled"], d.text_added["pooled"].to(store))
    assert e.captions == d.captions and e.shift_factor == pytest.approx(0.1)

    from dpdiff.data.records import PrivacyUnits
    from dpdiff.training.rows import RowBuilder

    units = PrivacyUnits("example", tuple((i,) for i in range(50)), tuple(str(i) for i in range(50)))
    rows = RowBuilder(e, units, augmult=2, random_flip=True, num_train_timesteps=1000, key=bytes(32)).build(
        [3, 17, 41], step=5)
    ref = RowBuilder(d, units, augmult=2, random_flip=True, num_train_timesteps=1000, key=bytes(32)).build(
        [3, 17, 41], step=5)
    assert rows.latents.dtype == torch.float32 and rows.encoder_hidden_states.dtype == torch.float32
    tol = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    torch.testing.assert_close(rows.latents, ref.latents, rtol=tol, atol=tol)
    torch.testing.assert_close(rows.noise, ref.noise)  # the draws do not depend on the storage


def test_a_damaged_feature_store_is_recomputed_not_trusted(tmp_path):
    from dpdiff.training.encode import load_encoded

    p = tmp_path / "f.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert load_encoded(p) is None
    p.write_bytes(b"\x01")
    assert load_encoded(p) is None


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_loading_the_feature_store_does_not_copy_it_into_private_memory(tmp_path):
    """134 MB of cached latents: mapping them and gathering a batch adds almost nothing to the process's private
    (anonymous) memory; the pages read are the page cache's, shared by a node's processes. Copying the tensor
    (what reading the file whole would do) adds all of it: the measurement can see the difference."""
    from dpdiff.runtime import PhaseClock
    from dpdiff.training.encode import EncodedData, load_encoded, save_encoded

    n = 8192
    d = EncodedData(torch.ones(n, 1, 4, 32, 32), torch.ones(n, 1, 4, 32, 32), torch.ones(4, 5, 8),
                    torch.zeros(n, dtype=torch.long), ["a", "b", "c", "d"], 1.0, 0.0)
    p = tmp_path / "big.safetensors"
    save_encoded(d, p, dtype="float32")  # 2 x 8192 x 4096 x 4 bytes = 268 MB
    del d
    private = lambda: PhaseClock.memory_mib()["private_mib"]  # noqa: E731
    before = private()
    e = load_encoded(p)
    batch = e.latent_mean[torch.arange(0, n, 64)].float()  # 128 rows
    mapped = private() - before
    copy = e.latent_mean.clone()
    copied = private() - before - mapped
    assert batch.shape[0] == 128 and copy.shape[0] == n
    assert mapped < 20 and copied > 100, (mapped, copied)


def _demo_records(n):
    from dpdiff.data.demos import builtin_digits_dir
    from dpdiff.data.formats import read_dataset

    return read_dataset(builtin_digits_dir())[:n]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_store_written_batch_by_batch_equals_the_in_memory_encoding(tmp_path, dtype):
    from dpdiff.models.loading import load_base
    from dpdiff.training.encode import FEATURE_DTYPES, encode_dataset, encode_to_store, load_encoded

    base, recs = load_base(None), _demo_records(37)
    kw = dict(base=base, resolution=32, center_crop=True, flips=True, device="cpu", progress=False)
    ref = encode_dataset(recs, batch_size=8, **kw)  # the same batches: the same convolutions, bit for bit
    path = tmp_path / "features.safetensors"
    tmp_path.chmod(0o755)  # a cache folder someone else could list: the store makes it user-only
    encode_to_store(recs, path, dtype=dtype, batch_size=8, caption_batch_size=2, **kw)
    got = load_encoded(path)
    import os
    import stat

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700
    assert path.exists() and not path.with_name(path.name + ".partial").exists()
    assert not path.with_name(path.name + ".progress").exists()
    store = FEATURE_DTYPES[dtype]
    assert got.captions == ref.captions and torch.equal(got.text_index, ref.text_index)
    tol = dict(rtol=0, atol=0) if dtype == "float32" else {}
    torch.testing.assert_close(got.latent_mean, ref.latent_mean.to(store), **tol)
    torch.testing.assert_close(got.latent_std, ref.latent_std.to(store), **tol)
    torch.testing.assert_close(got.text_emb, ref.text_emb.to(store), **tol)


def test_an_interrupted_encode_resumes_where_it_stopped(tmp_path, monkeypatch):
    import dpdiff.training.encode as encode
    from dpdiff.models.loading import load_base

    base, recs = load_base(None), _demo_records(40)
    kw = dict(base=base, resolution=32, center_crop=True, flips=False, device="cpu", progress=False)
    path = tmp_path / "features.safetensors"
    real, calls = encode._encode_image_batch, []

    def crashing(records, **k):
        calls.append(len(records))
        if len(calls) == 4:  # the shape probe, then 2 batches, then a crash
            raise KeyboardInterrupt
        return real(records, **k)

    monkeypatch.setattr(encode, "_encode_image_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        encode.encode_to_store(recs, path, dtype="float32", batch_size=8, **kw)
    assert not path.exists() and path.with_name(path.name + ".partial").exists()
    calls.clear()
    monkeypatch.setattr(encode, "_encode_image_batch", lambda records, **k: (calls.append(len(records)),
                                                                            real(records, **k))[1])
    encode.encode_to_store(recs, path, dtype="float32", batch_size=8, **kw)
    assert calls == [1, 8, 8, 8]  # the shape probe and the 3 batches not done before the crash
    whole = encode.encode_dataset(recs, batch_size=8, **kw)
    torch.testing.assert_close(encode.load_encoded(path).latent_mean, whole.latent_mean, rtol=0, atol=0)
    calls.clear()
    encode.encode_to_store(recs, path, dtype="float32", batch_size=8, **kw)  # done: nothing encoded again
    assert calls == []


def test_captions_encoded_on_the_fly_give_the_cached_rows(tmp_path):
    """data.text_features=on_the_fly: the store holds no text rows, and the rows the builder makes carry the same
    conditioning as from cached text (float32 store: equal to float rounding), every other draw unchanged."""
    from dpdiff.data.records import group_units
    from dpdiff.models.loading import load_base
    from dpdiff.training.encode import encode_captions, encode_to_store, load_encoded
    from dpdiff.training.rows import RowBuilder

    base, recs = load_base(None), _demo_records(24)
    kw = dict(base=base, resolution=32, center_crop=True, flips=False, device="cpu", progress=False,
              dtype="float32", batch_size=8)
    encode_to_store(recs, tmp_path / "cached.safetensors", **kw)
    encode_to_store(recs, tmp_path / "lean.safetensors", text=False, **kw)
    cached, lean = load_encoded(tmp_path / "cached.safetensors"), load_encoded(tmp_path / "lean.safetensors")
    assert lean.text_emb is None and lean.text_conditioning() == {} and lean.captions == cached.captions
    assert (tmp_path / "lean.safetensors").stat().st_size < (tmp_path / "cached.safetensors").stat().st_size
    units = group_units(recs, unit="example")
    calls = []

    def encoder(captions):
        calls.append(len(captions))
        return encode_captions(base, captions, device="cpu")

    common = dict(augmult=2, random_flip=False, num_train_timesteps=1000, key=b"k" * 32)
    a = RowBuilder(cached, units, **common).build([0, 3, 5, 9], step=4)
    b = RowBuilder(lean, units, text_encoder=encoder, **common).build([0, 3, 5, 9], step=4)
    # each distinct caption of the batch encoded once, in one fixed-size chunk (padded with empty captions)
    from dpdiff.training.rows import TEXT_CHUNK

    assert calls == [TEXT_CHUNK]
    for name in ("latents", "noise", "timesteps", "unit_pos", "row_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(b.encoder_hidden_states, a.encoder_hidden_states, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="text_encoder"):
        RowBuilder(lean, units, **common)


def test_string_table_reads_like_a_list_of_strings():
    from dpdiff.training.encode import StringTable

    words = ["", "a digit 3", "Grüße, 数字", "x" * 300]
    t = StringTable.of(words)
    assert len(t) == 4 and list(t) == words and t == words and t[2] == words[2] and t[-1] == words[-1]
    assert [t[i] for i in range(4)] == words and t[1:3] == words[1:3] and StringTable.of(t) is t
    with pytest.raises(IndexError):
        t[4]


def test_feature_cache_reuses_a_store_and_invalidates_on_every_input(tmp_path, monkeypatch):
    """FeatureCache: the same records, encoders and transform read the store back without encoding; another
    image, caption, resolution, flip, feature dtype or an edited encoder file names a new store; dpdiff clean's
    listing sees them."""
    import dataclasses
    import os
    from pathlib import Path

    import dpdiff.training.encode as encode
    from dpdiff.models.loading import load_base

    base, recs = load_base(None), _demo_records(6)
    cache = encode.FeatureCache(tmp_path / "cache")
    kw = dict(base=base, device="cpu", resolution=32, center_crop=True, flips=False, frozen_dtype="float32",
              feature_dtype="float16", progress=False)
    real, calls = encode._encode_image_batch, []
    monkeypatch.setattr(encode, "_encode_image_batch", lambda records, **k: (calls.append(len(records)),
                                                                            real(records, **k))[1])
    enc, path = cache.features(recs, **kw)
    assert calls and path.parent == cache.root and enc.latent_mean.shape[0] == 6
    calls.clear()
    again, same = cache.features(recs, **kw)
    assert same == path and calls == []  # read back, nothing encoded
    torch.testing.assert_close(again.latent_mean, enc.latent_mean, rtol=0, atol=0)
    others = {
        "another image": (recs[:5] + [recs[4]], {}),
        "another caption": ([*recs[:5], dataclasses.replace(recs[5], text=recs[5].text + " x")], {}),
        "resolution": (recs, {"resolution": 16}),
        "flips": (recs, {"flips": True}),
        "feature dtype": (recs, {"feature_dtype": "float32"}),
    }
    paths = {path}
    for what, (r, change) in others.items():
        p = cache.path(r, **{**{k: v for k, v in kw.items() if k not in ("device", "progress")}, **change,
                             "max_sequence_length": None, "text": True})
        assert p not in paths, what
        paths.add(p)
    vae_file = next((Path(base.path) / "vae").iterdir())
    st = vae_file.stat()
    try:
        os.utime(vae_file, (st.st_atime, st.st_mtime + 5))  # an edited encoder file
        p = cache.path(recs, **{k: v for k, v in kw.items() if k not in ("device", "progress")},
                       max_sequence_length=None, text=True)
        assert p not in paths
    finally:
        os.utime(vae_file, (st.st_atime, st.st_mtime))
    assert path in cache.entries()
