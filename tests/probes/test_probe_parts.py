"""Pieces of the probes without a trained model: PIA's v-prediction conversion, the extraction
calibrations, label-blind caption choice, and white-box gradient canaries on a simulated DP-SGD."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import probe_section

from dpdiff.probes.extraction import (
    calibrated_threshold,
    clique_size_threshold,
    draw_units,
    expected_distinct_captions,
    leak_p_value,
)
from dpdiff.training.loss import epsilon_from_prediction


def test_v_prediction_is_converted_to_the_noise_estimate():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in (0, 200, 900):
        tt = torch.full((3,), t, dtype=torch.long)
        xt = sched.add_noise(x0, eps, tt)
        v = sched.get_velocity(x0, eps, tt)  # the reference: diffusers' own v target
        a = sched.alphas_cumprod[t]
        got = epsilon_from_prediction(v, xt, a, prediction_type="v_prediction")
        assert torch.allclose(got, eps, atol=1e-4)
        assert epsilon_from_prediction(eps, xt, a, prediction_type="epsilon") is eps
    with pytest.raises(ValueError):
        epsilon_from_prediction(eps, xt, a, prediction_type="sample")


def test_calibrated_threshold_keeps_held_out_images_from_matching():
    near = np.array([0.05, 0.08, 0.10, 0.12, 0.14, 0.2, 0.3, 0.3, 0.4, 0.5])
    # 87%-style case: most held-out images are within 0.15 of some training image
    thr = calibrated_threshold(l2_threshold=0.15, heldout_nearest=near, max_false_match_rate=0.1)
    assert thr < 0.08 and np.mean(near <= thr) <= 0.1  # one of ten may match
    assert calibrated_threshold(l2_threshold=0.15, heldout_nearest=near, max_false_match_rate=0.0) < 0.05
    far = np.full(10, 0.4)
    assert calibrated_threshold(l2_threshold=0.15, heldout_nearest=far, max_false_match_rate=0.05) == 0.15
    assert calibrated_threshold(l2_threshold=0.15, heldout_nearest=None, max_false_match_rate=0.05) == 0.15


def test_clique_rule_is_calibrated_on_held_out_captions():
    assert clique_size_threshold([2, 5, 3], minimum=3) == 6  # held-out captions reach 5: flag only from 6
    assert clique_size_threshold([1, 1], minimum=3) == 3
    assert clique_size_threshold([], minimum=3) is None


def test_units_are_drawn_uniformly_within_each_side():
    """A stratified uniform draw: the probed split is exchangeable. Inclusion frequencies over 5000 seeds are
    checked at 6 standard deviations (false failure < 1e-7 over the 30 units)."""
    members, held = list(range(10)), list(range(100, 120))
    mem, hold = draw_units(members, held, units=3, seed=7)
    assert (mem, hold) == draw_units(members, held, units=3, seed=7)  # seeded
    assert mem == sorted(mem) and len(mem) == len(hold) == 3 and set(mem) <= set(members)
    assert len(draw_units(members, held[:2], units=3, seed=7)[0]) == 2  # as many of each side
    # the member draw is blind to what the held-out units are (content-blind), only to how many are drawn
    assert draw_units(members, list(range(500, 520)), units=3, seed=7)[0] == mem
    seeds = 5000
    counts_m, counts_h = np.zeros(10), np.zeros(20)
    for s in range(seeds):
        m, h = draw_units(members, held, units=3, seed=s)
        counts_m[m] += 1
        counts_h[np.asarray(h) - 100] += 1
    for counts, p in ((counts_m, 0.3), (counts_h, 0.15)):
        sd = np.sqrt(p * (1 - p) / seeds)
        assert np.all(np.abs(counts / seeds - p) < 6 * sd)
    assert draw_units([], held, units=3, seed=0) == ([], [])


def test_expected_distinct_captions_is_exact():
    # pairs of ["a", "a", "b"]: {a, a} has 1 caption, {a, b} twice has 2: (1 + 2 + 2) / 3
    assert expected_distinct_captions(["a", "a", "b"], 2) == pytest.approx(5 / 3)
    assert expected_distinct_captions(["a", "b", "c"], 3) == 3 and expected_distinct_captions(["a"], 0) == 0
    from itertools import combinations

    caps = ["a"] * 4 + ["b"] * 2 + ["c", "d", "e"]
    exact = np.mean([len({caps[i] for i in c}) for c in combinations(range(len(caps)), 4)])
    assert expected_distinct_captions(caps, 4) == pytest.approx(exact)


def test_leak_p_value_is_the_exact_permutation_test():
    is_member = np.r_[np.ones(16, bool), np.zeros(16, bool)]
    eight = np.r_[np.ones(8, bool), np.zeros(24, bool)]  # 8 training images extracted, no held-out match
    assert leak_p_value(eight, is_member) == pytest.approx(12870 / 10518300)  # C(16,8) / C(32,8) = 0.0012
    assert leak_p_value(np.zeros(32, bool), is_member) == 1.0
    even = np.r_[np.ones(4, bool), np.zeros(12, bool), np.ones(4, bool), np.zeros(12, bool)]
    assert leak_p_value(even, is_member) > 0.5  # as many held-out as training matches: no evidence
    # the p-value is exact: under random labels P[p <= 0.05] <= 0.05 (checked over every labelling of 10)
    from itertools import combinations

    matched = np.r_[np.ones(4, bool), np.zeros(6, bool)]
    ps = []
    for c in combinations(range(10), 5):
        lab = np.zeros(10, bool)
        lab[list(c)] = True
        ps.append(leak_p_value(matched, lab))
    assert np.mean(np.asarray(ps) <= 0.05) <= 0.05


def test_nearest_training_in_batches_equals_the_full_search(monkeypatch):
    import dpdiff.probes.extraction as extraction
    from dpdiff.probes.metrics import cross_l2

    rng = np.random.default_rng(3)
    train = rng.random((23, 8, 8, 3)).astype(np.float32)
    queries = rng.random((5, 8, 8, 3)).astype(np.float32)
    calls = []

    def load(ctx, ids, size=None):
        calls.append(len(ids))
        return train[list(ids)]

    monkeypatch.setattr(extraction, "_load_images", load)
    best, arg = extraction.nearest_training(None, queries, list(range(23)), size=8, batch=4)
    full = np.minimum(cross_l2(queries, train), cross_l2(queries, train[:, :, ::-1]))
    assert np.allclose(best, full.min(1)) and np.array_equal(arg, full.argmin(1))
    assert max(calls) == 4 and sum(calls) == 23  # never more than one batch of training images in memory


def _accounted_epsilon(q, sigma, steps, delta):
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q,steps,count", [(1.0, 2, 20_000),
                                           pytest.param(0.01, 1000, 100_000, marks=pytest.mark.slow)])  # 10 s
def test_gradient_canaries_on_a_simulated_dp_sgd_run(q, steps, count):
    """Dirac canaries in a DP-SGD loop (clipped sum + Gaussian noise, Poisson sampling, sigma = 1),
    audited from the noisy sums: the rigorous bound stays below the accounted epsilon (dp_accounting's
    PLD) and the Gaussian-curve bound comes within a factor 2 of it. Full batches, 2 steps, 20000
    canaries: 3.7-3.9 of 6.6; q = 0.01, 1000 steps, 100000 canaries: 1.13-1.18 of 1.83 (rigorous 0.93).
    With 20000 canaries at q = 0.01 the Gaussian-curve bound is only 0.8-0.9 (about 2.1x): subsampled
    runs need many canaries, which gradient canaries make cheap."""
    from dpdiff.privacy.gradient_canaries import GradientCanaries
    from dpdiff.probes.audit import gradient_canary_k_choices, one_run_audit

    sigma, clip, delta = 1.0, 0.5, 1e-5
    can = GradientCanaries(count=count, num_params=count, seed=3)
    g, coins = torch.Generator().manual_seed(4), np.random.default_rng(5)
    for _ in range(steps):
        # the released sum: the other units' clipped sum (orthogonal to the canaries here) plus the noise; the
        # canaries are scored beside it
        noisy = sigma * clip * torch.randn(count, generator=g)
        can.observe(noisy, noise_multiplier=sigma, sample_rate=q, clip_norm=clip, rng=coins)
    data = can.to_json()
    assert data["steps"] == steps and len(set(data["coordinates"])) == count
    res = one_run_audit(scores=np.array(data["scores"]), included=np.array(data["included"]), delta=delta,
                        choices=gradient_canary_k_choices(count))
    accounted = _accounted_epsilon(q, sigma, steps, delta)
    assert res["eps_lower"] <= accounted
    assert res["eps_lower_gdp"] >= accounted / 2, (res["eps_lower_gdp"], accounted)


def test_gradient_canaries_refuse_nonsense():
    from dpdiff.errors import UserError
    from dpdiff.privacy.gradient_canaries import GradientCanaries

    with pytest.raises(UserError):
        GradientCanaries(count=1, num_params=10, seed=0)
    with pytest.raises(UserError):
        GradientCanaries(count=11, num_params=10, seed=0)
    with pytest.raises(TypeError):
        GradientCanaries(5, 10, 0)  # type: ignore[misc]


def test_one_record_per_privacy_unit():
    from dpdiff.probes.context import ProbeContext

    recs = [SimpleNamespace(text="t", user_id=u) for u in ["a", "a", "b", "c", "b"]]
    ctx = ProbeContext(run_dir=None, base=None, denoiser=None, adapter_kind="lora", records=recs, member_records=[],
                       nonmember_records=[], resolution=8, device="cpu", privacy={"privacy_unit": "user"})
    assert ctx.one_record_per_unit([4, 1, 0, 2, 3]) == [0, 2, 3]
    ctx.privacy = {"privacy_unit": "example"}
    assert ctx.one_record_per_unit([4, 1, 0]) == [0, 1, 4]
    ctx.unit_of_record = {0: 7, 1: 7, 2: 8, 3: 9, 4: 9}  # e.g. near-duplicates grouped into one unit
    assert ctx.one_record_per_unit([0, 1, 2, 3, 4]) == [0, 2, 3]


@pytest.mark.parametrize("count,shift,claimed,expected", [
    (30000, 0.0, 1.0, "PASS"),  # enough canaries to detect twice the claim with 80% power
    (4000, 0.0, 1.0, "INCONCLUSIVE"),  # ceiling above 1, but only epsilon 3 is detected: not green
    (4000, 0.0, 8.0, "INCONCLUSIVE"), (4000, 6.0, 1.0, "FAIL"), (4000, 6.0, None, "FAIL"),
    (4000, 0.0, None, "INCONCLUSIVE")])
def test_run_audit_verdicts_from_recorded_gradient_canaries(tmp_path, count, shift, claimed, expected):
    from dpdiff.io import write_json_atomic
    from dpdiff.probes.context import ProbeContext
    from dpdiff.probes.run import run_audit

    rng = np.random.default_rng(0)
    included = rng.random(count) < 0.5
    scores = rng.standard_normal(count) + shift * included
    write_json_atomic(tmp_path / "gradient_canaries.json", {"count": count, "steps": 1, "coordinates": [],
                                                             "included": included.tolist(), "scores": scores.tolist()})
    privacy = {"dp": claimed is not None, "epsilon": claimed, "delta": 1e-5}
    ctx = ProbeContext(run_dir=tmp_path, base=None, denoiser=None, adapter_kind="lora", records=[], member_records=[],
                       nonmember_records=[], resolution=8, device="cpu", privacy=privacy)
    out = run_audit(ctx, probe_section("audit", {"confidence": 0.9}))
    assert out["verdict"] == expected, out["verdict_reason"]
    assert out["claimed_epsilon"] == claimed and out["confidence"] == 0.9
    assert out["gradient_canaries"]["m"] == count and out["ceiling"] >= out["eps_lower"]
    if claimed is not None:
        assert out["detectable_epsilon"] is None or out["detectable_epsilon"] >= claimed
        assert (out["detectable_epsilon"] is not None and out["detectable_epsilon"] <= 2 * claimed) == (
            expected == "PASS")
    if expected == "INCONCLUSIVE" and claimed is not None:
        assert "gradient canaries" in out["to_conclude"] and "twice the claim" in out["to_conclude"]


def _mia_ctx(n_members, n_held, claimed):
    from dpdiff.probes.context import ProbeContext

    recs = [SimpleNamespace(text="t", user_id=None) for _ in range(n_members + n_held)]
    return ProbeContext(run_dir=None, base=None, denoiser=None, adapter_kind="lora", records=recs,
                        member_records=list(range(n_members)), nonmember_records=list(range(n_members, len(recs))),
                        resolution=8, device="cpu", privacy={"dp": True, "epsilon": claimed, "delta": 1e-5})


@pytest.mark.parametrize("n_members,n_held,leak,claimed,expected", [
    (14, 2, 5.0, 1.0, "INCONCLUSIVE"),  # the 16-image folder: AUC 1.0 means nothing with 2 held out
    (300, 200, 0.0, 1.0, "INCONCLUSIVE"),  # 200 + 200 units detect only epsilon 8 at claim 1
    (300, 200, 6.0, 1.0, "FAIL"),
    (300, 90, 0.0, 7.97, "INCONCLUSIVE"),  # the demo: 90 held out cannot test epsilon 8
])
def test_run_mia_verdicts_from_synthetic_scores(monkeypatch, n_members, n_held, leak, claimed, expected):
    import dpdiff.probes.mia as mia

    def fake_loss_scores(ctx, ids, **kw):
        rng = np.random.default_rng(len(ids) + ids[0])
        is_member = np.array([i in set(ctx.member_records) for i in ids])
        return {"loss": rng.standard_normal(len(ids)) + leak * is_member,
                "calibrated": rng.standard_normal(len(ids)) + leak * is_member}

    monkeypatch.setattr(mia, "loss_scores", fake_loss_scores)
    monkeypatch.setattr(mia, "pia_scores", lambda ctx, ids, **kw: (-np.arange(len(ids), dtype=float),
                                                                    np.full(len(ids), 1.02)))
    out = mia.run_mia(_mia_ctx(n_members, n_held, claimed),
                      probe_section("mia", {"bootstrap": 50, "lira": {"shadows": 0}}), confidence=0.95)
    assert out["verdict"] == expected, out["verdict_reason"]
    assert out["members"] == out["nonmembers"] == min(n_members, n_held, 256)
    assert set(out["attacks"]) == {"loss", "calibrated", "pia"} and out["primary_attack"] == "calibrated"
    assert out["pia_diagnostic"]["on_distribution"] and out["pia_diagnostic"]["proxy_noise_rms_median"] == 1.02
    if n_held < 20:
        assert out["auc"] is None and out["attacks"]["calibrated"]["auc_observed"] == 1.0
        assert out["auc_p_value"] > 0.05
    else:
        assert out["auc"] is not None and out["auc_ci"] is not None
    if expected == "INCONCLUSIVE":
        assert out["to_conclude"]
    if n_held >= 20 and leak == 0.0:
        assert out["detectable_epsilon"] is None or out["detectable_epsilon"] > 2 * claimed
        assert "twice the claim" in out["to_conclude"]
        if out["ceiling"] > claimed:  # reachable, yet underpowered: the reason says what it detects
            assert "detects" in out["verdict_reason"]


def _extraction_setup(monkeypatch, *, memorise: bool | int, floor: float, heldout_near_training: bool = False,
                      held_out: bool = True):
    from PIL import Image

    import dpdiff.models.pipeline as pipeline
    import dpdiff.probes.extraction as extraction
    from dpdiff.probes.context import ProbeContext

    rng = np.random.default_rng(0)
    n = 20
    imgs = (rng.random((2 * n, 16, 16, 3)) * 255).astype(np.uint8)
    if heldout_near_training:  # held-out images that nearly equal a training image (like digits)
        imgs[n:] = np.clip(imgs[:n].astype(int) + rng.integers(-3, 4, imgs[:n].shape), 0, 255).astype(np.uint8)
    recs = [SimpleNamespace(text=(f"m{i}" if i < n else f"h{i}"), user_id=None, key=f"k{i}") for i in range(2 * n)]
    by_text = {r.text: i for i, r in enumerate(recs)}

    def fake_generate(pipe, prompts, *, seeds, **kw):
        out = []
        for p, s in zip(prompts, seeds):
            i = by_text[p]
            if i < (n if memorise is True else int(memorise)):
                out.append(Image.fromarray(imgs[i]))
            else:
                noise = np.random.default_rng([1000 + i, s]).random((16, 16, 3))
                out.append(Image.fromarray((noise * 255).astype(np.uint8)))
        return out

    monkeypatch.setattr(pipeline, "generate", fake_generate)
    monkeypatch.setattr(extraction, "_load_images",
                        lambda ctx, ids, size=None: imgs[list(ids)].astype(np.float32) / 255)
    monkeypatch.setattr(extraction, "vae_floor", lambda ctx, ids, **kw: np.full(len(ids), floor))
    monkeypatch.setattr(extraction, "_flagged_grid", lambda *a, **k: None)

    def ctx_for(claimed):
        ctx = ProbeContext(run_dir=None, base=None, denoiser=None, adapter_kind="lora", records=recs,
                           member_records=list(range(n)),
                           nonmember_records=list(range(n, 2 * n)) if held_out else [], resolution=16,
                           device="cpu", privacy={"dp": claimed is not None, "epsilon": claimed, "delta": 1e-5})
        ctx.pipeline = lambda: None
        return ctx

    cfg = probe_section("extraction", {"units": 20, "captions": 40, "per_caption": 2, "vae_floor_images": 8,
                                       "match_resolution": 16})
    return ctx_for, cfg


@pytest.mark.parametrize("memorise,floor,claimed,expected", [
    (True, 0.01, None, "FAIL"),           # a memorising model without DP: leak shown
    (True, 0.01, 0.5, "FAIL"),            # ... and beyond a claimed epsilon of 0.5
    (False, 0.01, 0.5, "INCONCLUSIVE"),   # nothing extracted, but 20 + 20 images detect no epsilon near 1
    (False, 0.3, 0.5, "INCONCLUSIVE"),    # the VAE cannot get within the threshold: could never fire
    (False, 0.01, 8.0, "INCONCLUSIVE"),   # 20 + 20 images cannot test epsilon 8
])
def test_run_extraction_verdicts(monkeypatch, memorise, floor, claimed, expected):
    from dpdiff.probes.extraction import run_extraction

    ctx_for, cfg = _extraction_setup(monkeypatch, memorise=memorise, floor=floor)
    out = run_extraction(ctx_for(claimed), cfg, confidence=0.95)
    assert out["verdict"] == expected, out["verdict_reason"]
    assert out["training_items_probed"] == out["heldout_items_probed"] == 20
    assert out["extracted_count"] == (20 if memorise else 0) and out["control_matches"] == 0
    assert 0 < out["rate_upper"] <= 1 and out["generation_resolution"] == 16
    if floor > 0.15:
        assert any("VAE" in b for b in out["blockers"])
    if claimed is not None and expected == "INCONCLUSIVE":
        assert out["detectable_epsilon"] is None or out["detectable_epsilon"] > 2 * claimed
        assert "twice the claim" in out["to_conclude"]
    assert any("Carlini" in w for w in out["warnings"])  # 2 generations per caption: a weak probe, said so


def test_run_extraction_calibrates_a_threshold_that_held_out_images_reach(monkeypatch):
    from dpdiff.probes.extraction import run_extraction

    ctx_for, cfg = _extraction_setup(monkeypatch, memorise=False, floor=0.0, heldout_near_training=True)
    out = run_extraction(ctx_for(1.0), cfg, confidence=0.95)
    assert out["heldout_false_match_rate"] == 1.0  # every held-out image "matches" a training image at 0.15
    assert out["l2_threshold"] < 0.02 and out["heldout_false_match_rate_calibrated"] <= 0.05
    assert any("does not separate" in w for w in out["warnings"])
    assert out["verdict"] != "FAIL"


def test_a_non_private_run_with_some_extracted_images_is_fail(monkeypatch):
    """8 of 20 training images extracted, no held-out match: the exact permutation test says leak (p ~ 1e-3)."""
    from dpdiff.probes.extraction import run_extraction

    ctx_for, cfg = _extraction_setup(monkeypatch, memorise=8, floor=0.01)
    out = run_extraction(ctx_for(None), cfg, confidence=0.95)
    assert out["extracted_count"] == 8 and out["control_matches"] == 0
    assert out["leak_p_value"] < 0.01 and out["verdict"] == "FAIL", out["verdict_reason"]
    assert set(out["detectors"]) == {"l2", "tiled_l2", "clique"} and set(out["split_audit"]) == set(out["detectors"])
    _, cfg0 = _extraction_setup(monkeypatch, memorise=0, floor=0.01)
    out0 = run_extraction(ctx_for(None), cfg0, confidence=0.95)
    assert out0["leak_p_value"] == 1.0 and out0["verdict"] == "INCONCLUSIVE"


def test_extraction_without_held_out_units_has_ceiling_zero(monkeypatch):
    from dpdiff.probes.extraction import run_extraction

    ctx_for, cfg = _extraction_setup(monkeypatch, memorise=True, floor=0.01, held_out=False)
    out = run_extraction(ctx_for(1.0), cfg, confidence=0.95)
    assert out["ceiling"] == 0.0 and out["eps_lower"] == 0.0 and out["verdict"] == "INCONCLUSIVE"
    assert out["heldout_items_probed"] == 0 and out["training_items_probed"] == 0


def test_extraction_probes_fewer_units_when_the_generation_budget_is_short(monkeypatch):
    from dpdiff.probes.extraction import run_extraction

    ctx_for, cfg = _extraction_setup(monkeypatch, memorise=False, floor=0.01)
    out = run_extraction(ctx_for(1.0), {**cfg, "captions": 10}, confidence=0.95)
    assert out["training_items_probed"] == out["heldout_items_probed"] == 5  # 10 unique captions: 5 + 5
    assert out["captions_probed"] == 10 and any("generation budget" in w for w in out["warnings"])


def test_pia_diagnostic_flags_an_off_distribution_proxy_noise():
    from dpdiff.probes.mia import pia_diagnostic

    rng = np.random.default_rng(0)
    gauss = np.sqrt((rng.standard_normal((64, 4 * 8 * 8)) ** 2).mean(1))  # RMS of real Gaussian draws
    ok = pia_diagnostic(gauss[:32], gauss[32:])
    assert ok["on_distribution"] and abs(ok["proxy_noise_rms_median"] - 1) < 0.1  # 256 coords: sd ~0.045
    off = pia_diagnostic(gauss[:32] * 0.2, gauss[32:] * 0.2)  # an over-trained model's eps(x0, 0) collapses
    assert not off["on_distribution"] and "off the training distribution" in off["note"]
