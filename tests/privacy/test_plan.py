"""The privacy plan: resume reconciliation, the refusal messages, and an exact dataset ledger."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from dpdiff.errors import UserError
from dpdiff.privacy.accountants import MechanismSegment, get_accountant
from dpdiff.privacy.dataset_ledger import DatasetLedger, compose_runs, ledger_location
from dpdiff.privacy.ledger import PrivacyLedger, slice_segments
from dpdiff.privacy.plan import DatasetIdentity, PrivacyPlan, ResumePoint, resolve_mechanism
from dpdiff.privacy.settings import PrivacySettings

N, B = 200, 20  # q = 0.1


def settings(**kw) -> PrivacySettings:
    base = dict(enabled=True, target_epsilon=8.0, delta=1e-4, max_grad_norm=1.0, accountant="rdp", augmult=1,
                unit="example", max_images_per_user=None, noise_multiplier=None, reproducible_noise=False,
                secure_rng=False,                dataset_budget=None, dataset_delta=None, dataset_ledger=None)
    base.update(kw)
    return PrivacySettings(**base)


def dataset(root: Path, fp: str = "f" * 64, source: str | None = None) -> DatasetIdentity:
    root.mkdir(parents=True, exist_ok=True)
    return DatasetIdentity(root=root, fingerprint=fp, source_fingerprint=source or fp)


def build(tmp_path, run: str, *, s=None, max_steps=60, resume=None, data=None) -> PrivacyPlan:
    return PrivacyPlan.build(settings=s or settings(), dataset=data or dataset(tmp_path / "data"), num_units=N,
                             batch_size=B, max_steps=max_steps, seed=0, run_dir=tmp_path / run, resume=resume)


def train(plan: PrivacyPlan, steps: int) -> None:
    (plan.run_dir).mkdir(parents=True, exist_ok=True)
    for _ in range(steps):
        assert plan.may_step()
        plan.record_step()
        plan.save_ledger()


def resume_point(plan: PrivacyPlan, *, checkpoint_step: int, ledger_on_disk: bool = True) -> ResumePoint:
    """A checkpoint taken at ``checkpoint_step`` of ``plan``'s run dir (its ledger file may hold more steps)."""
    led = PrivacyLedger.from_dict(plan.ledger.to_dict())
    led.segments = slice_segments(led.segments, 0, checkpoint_step)
    ckpt = plan.run_dir / f"checkpoint-{checkpoint_step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    if not ledger_on_disk:
        (plan.run_dir / "privacy_ledger.json").unlink()
    state = {"step": checkpoint_step, **plan.state_dict(), "ledger": led.to_dict()}
    return ResumePoint.from_checkpoint(path=ckpt, state=state)


def test_crash_resume_message_gives_the_steps_that_work(tmp_path):
    """Killed at step 29 of 60 with a checkpoint at 20: all 29 spent steps count, so 51 steps fit, not 60."""
    a = build(tmp_path, "a")
    a.dataset_charge.charge(status="planned")
    train(a, 29)
    rp = resume_point(a, checkpoint_step=20)
    assert rp.ledger.steps == 29 and rp.discarded_steps == 9
    with pytest.raises(UserError) as err:
        build(tmp_path, "b", max_steps=60, resume=rp)
    msg = str(err.value)
    assert "at most 51 steps fit: set train.max_steps<=51" in msg
    assert "29 steps already in the ledger" in msg and "9 of them after the checkpoint at step 20" in msg
    b = build(tmp_path, "b", max_steps=51, resume=rp)  # the number given works
    assert b.mechanism.steps == 60 and b.mechanism.epsilon_planned <= 8.0


def test_resume_refuses_another_unit_delta_or_dataset(tmp_path):
    a = build(tmp_path, "a")
    train(a, 3)
    rp = resume_point(a, checkpoint_step=3)
    with pytest.raises(UserError, match="privacy.unit=example"):
        build(tmp_path, "b", s=settings(unit="user"), resume=rp)
    with pytest.raises(UserError, match="privacy.delta=1e-05"):
        build(tmp_path, "b", s=settings(delta=1e-5), resume=rp)
    with pytest.raises(UserError, match="another dataset"):
        build(tmp_path, "b", resume=rp, data=dataset(tmp_path / "data", fp="0" * 64))
    with pytest.raises(UserError, match="reproducible_noise"):
        build(tmp_path, "b", s=settings(reproducible_noise=True), resume=rp)
    assert build(tmp_path, "b", resume=rp).ledger.privacy_unit == "example"  # the same settings resume


def _total(tmp_path, data: DatasetIdentity) -> dict:
    loc = ledger_location(data_root=data.root, source_fingerprint=data.source_fingerprint)
    entries = DatasetLedger(loc).entries({data.fingerprint, data.source_fingerprint})
    return {"entries": entries, **compose_runs(entries, delta=1e-4, accountant="rdp")}


def _eps(steps: int, sigma: float) -> float:
    return get_accountant("rdp").epsilon(history=[MechanismSegment(sigma, B / N, steps)], delta=1e-4).epsilon


def test_dataset_ledger_counts_every_attempt_once(tmp_path):
    """Two fresh attempts in one run dir, two resumes branching from one checkpoint, a crash and its resume:
    the dataset's total composes exactly the steps each attempt spent."""
    data = dataset(tmp_path / "data")
    fixed = settings(noise_multiplier=1.0, target_epsilon=None)
    # two fresh attempts into the same run dir (each is its own spend)
    for _ in range(2):
        p = build(tmp_path, "same", s=fixed, max_steps=5, data=data)
        p.dataset_charge.charge(status="planned")
        train(p, 5)
        p.dataset_charge.charge(status="finished")
    assert _total(tmp_path, data)["steps"] == 10
    # a run of 10 steps, then two resumes from its checkpoint into different dirs, 5 steps each
    a = build(tmp_path, "a", s=fixed, max_steps=10, data=data)
    a.dataset_charge.charge(status="planned")
    train(a, 10)
    a.dataset_charge.charge(status="finished")
    rp = resume_point(a, checkpoint_step=10)
    for d in ("x", "y"):
        b = build(tmp_path, d, s=fixed, max_steps=15, data=data, resume=rp)
        b.dataset_charge.charge(status="planned")
        train(b, 5)
        b.dataset_charge.charge(status="finished")
    assert _total(tmp_path, data)["steps"] == 10 + 10 + 5 + 5
    # a crash: planned 60, killed after 29 (checkpoint at 20); the resume corrects the planned entry to 29
    c = build(tmp_path, "c", s=fixed, max_steps=60, data=data)
    c.dataset_charge.charge(status="planned")
    train(c, 29)
    assert _total(tmp_path, data)["steps"] == 30 + 60  # until then the crashed attempt counts as planned
    d = build(tmp_path, "d", s=fixed, max_steps=30, data=data, resume=resume_point(c, checkpoint_step=20))
    d.dataset_charge.charge(status="planned")
    train(d, 10)
    d.dataset_charge.charge(status="finished")
    t = _total(tmp_path, data)
    assert t["steps"] == 30 + 29 + 10
    assert t["epsilon"] == pytest.approx(_eps(69, 1.0), rel=1e-9)
    statuses = sorted(e.status for e in t["entries"])
    assert statuses.count("ended") == 1 and "planned" not in statuses


def test_budget_finds_runs_by_the_folder_as_listed(tmp_path):
    """A run that skipped bad files trained on fewer records (another fingerprint); `dpdiff budget` computes the
    fingerprint of the folder as listed, and finds it."""
    data = dataset(tmp_path / "data", fp="a" * 64, source="b" * 64)
    p = build(tmp_path, "r", data=data)
    p.dataset_charge.charge(status="planned")
    loc = ledger_location(data_root=data.root, source_fingerprint="b" * 64)
    assert [e.attempt_id for e in DatasetLedger(loc).entries({"b" * 64})] == [p.attempt_id]


def test_read_only_dataset_ledger_lives_in_home_and_is_found(tmp_path, monkeypatch):
    import os

    from dpdiff.privacy import dataset_ledger

    monkeypatch.setenv("DPDIFF_HOME", str(tmp_path / "home"))
    data = dataset(tmp_path / "ro")
    monkeypatch.setattr(dataset_ledger.os, "access", lambda p, mode: os.path.realpath(p) != str(data.root))
    p = build(tmp_path, "r", data=data)
    p.dataset_charge.charge(status="planned")
    loc = ledger_location(data_root=data.root, source_fingerprint=data.source_fingerprint)
    assert loc.write.is_relative_to(tmp_path / "home")
    assert len(DatasetLedger(loc).entries({data.fingerprint})) == 1


def test_dataset_budget_refused_before_training(tmp_path):
    data = dataset(tmp_path / "data")
    a = build(tmp_path, "a", data=data)
    a.dataset_charge.charge(status="planned")
    b = build(tmp_path, "b", data=data, s=settings(dataset_budget=10.0))
    with pytest.raises(UserError, match="privacy.dataset_budget=10"):
        b.dataset_charge.charge(status="planned")


def test_non_private_and_reproducible_runs_leave_no_finite_total(tmp_path):
    data = dataset(tmp_path / "data")
    build(tmp_path, "a", data=data, s=settings(reproducible_noise=True)).dataset_charge.charge(status="planned")
    assert _total(tmp_path, data)["epsilon"] < math.inf  # one seeded run alone: its own epsilon
    build(tmp_path, "b", data=data).dataset_charge.charge(status="planned")
    assert _total(tmp_path, data)["epsilon"] == math.inf  # seeded noise does not compose as independent
    data2 = dataset(tmp_path / "data2")
    build(tmp_path, "c", data=data2, s=replace(settings(), enabled=False)).dataset_charge.charge(status="planned")
    assert _total(tmp_path, data2)["epsilon"] == math.inf


def test_resolve_mechanism_uses_the_rate_of_the_expected_units():
    """With audit canaries, q comes from users' units + the canaries' expected count, not from the coins."""
    m = resolve_mechanism(settings(), num_units=100 + 500 * 0.5, batch_size=35, max_steps=10)
    assert m.sample_rate == pytest.approx(35 / 350)


def _draw(noise, n: int = 1000):
    import torch

    return noise.fill_(torch.empty(n), 1.0)


def test_fresh_entropy_by_default_seeded_only_when_asked():
    from dpdiff.privacy.randomness import PrivacyRandomness

    fresh = [PrivacyRandomness(reproducible=False, seed=0) for _ in range(2)]
    masks = [r.sampling_rng().random(1000) < 0.5 for r in fresh]
    noise = [_draw(r.noise()) for r in fresh]
    # two fresh streams agree on 1000 coins / normals with probability 2^-1000 / 0
    assert (masks[0] != masks[1]).any() and not noise[0].equal(noise[1])
    seeded = [PrivacyRandomness(reproducible=True, seed=0) for _ in range(2)]
    assert (seeded[0].sampling_rng().random(100) == seeded[1].sampling_rng().random(100)).all()
    assert _draw(seeded[0].noise()).equal(_draw(seeded[1].noise()))
    # a resume on another number of processes, or from another step, never replays a stream
    other = PrivacyRandomness(reproducible=True, seed=0, world_size=2, start_step=0)
    later = PrivacyRandomness(reproducible=True, seed=0, world_size=1, start_step=20)
    base = seeded[0].sampling_rng().random(100)
    assert (other.sampling_rng().random(100) != base).any() and (later.sampling_rng().random(100) != base).any()
    # the noise, the masks and the canary coins are separate streams: the noise's first normals are not a
    # function of the masks' first uniforms
    r = PrivacyRandomness(reproducible=True, seed=0)
    import numpy as np
    from scipy.stats import norm

    as_normals = norm.ppf(r.sampling_rng().random(4))
    assert not np.allclose(_draw(r.noise(), 4).numpy(), as_normals, atol=1e-3)
    assert not np.array_equal(r.canary_rng().random(4), r.sampling_rng().random(4))


def test_noise_keeps_every_bit_of_its_seed():
    """torch's CPU generator keeps the low 32 bits of a seed (12345, 12345 + 2^32 and 12345 + 7 * 2^40 draw alike);
    the noise source keeps all of them: seeds differing only above bit 32, or only in bit 127, draw different
    noise (equal 1000-normal draws from different streams: probability 0)."""
    import torch

    from dpdiff.privacy.randomness import GaussianNoise

    assert torch.randn(8, generator=torch.Generator().manual_seed(12345)).equal(
        torch.randn(8, generator=torch.Generator().manual_seed(12345 + 2**32)))  # the trap this guards against
    seeds = [12345, 12345 + 2**32, 12345 + 7 * 2**40, 12345 + 2**63, 12345 + 2**127]
    draws = [_draw(GaussianNoise.seeded(s)) for s in seeds]
    for a in range(len(draws)):
        for b in range(a + 1, len(draws)):
            assert not draws[a].equal(draws[b]), (seeds[a], seeds[b])
    # threaded chunks: each child a distinct stream, reproducible from the parent's seed
    kids = [_draw(c) for c in GaussianNoise.seeded(1).children(3)]
    assert not kids[0].equal(kids[1]) and not kids[1].equal(kids[2])
    assert _draw(GaussianNoise.seeded(1).children(3)[2]).equal(kids[2])
    with pytest.raises(TypeError, match="32 bits"):
        from torch import nn

        from dpdiff.privacy.engines import DPSGDEngine

        DPSGDEngine(nn.Linear(2, 2), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                    noise=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_expected_statistics(secure):
    """2^20 draws at std 0.3 (PCG64DXSM, or the ChaCha20 keystream of privacy.secure_rng): mean within 6 standard
    errors of 0, std within 6 standard errors of 0.3, fourth moment / std^4 within 0.05 of 3 (its standard error
    is 0.0024). Seeded: deterministic, no false failures; with fresh seeds each bound fails with p < 2e-9."""
    import torch

    from dpdiff.privacy.randomness import GaussianNoise

    n, std = 2**20, 0.3
    z = GaussianNoise.seeded(11, secure=secure).fill_(torch.empty(n), std).double()
    assert abs(float(z.mean())) < 6 * std / n**0.5
    assert abs(float(z.std()) - std) < 6 * std / (2 * n) ** 0.5
    assert abs(float((z**4).mean()) / std**4 - 3.0) < 0.05


def test_reproducible_noise_resumes_where_it_stopped():
    import torch

    from dpdiff.privacy.randomness import GaussianNoise

    a = GaussianNoise.seeded(5)
    _draw(a, 10), a.children(2)
    state = a.state_dict()
    want = [_draw(a, 7), *[_draw(c, 3) for c in a.children(2)]]
    b = GaussianNoise.seeded(5)
    b.load_state_dict(state)
    got = [_draw(b, 7), *[_draw(c, 3) for c in b.children(2)]]
    assert all(x.equal(y) for x, y in zip(want, got))
    assert not torch.equal(want[0], _draw(GaussianNoise.seeded(5), 7))  # the state moved the stream on


def test_ledger_file_keeps_unit_fingerprint_and_attempts(tmp_path):
    a = build(tmp_path, "a")
    train(a, 2)
    d = json.loads((a.run_dir / "privacy_ledger.json").read_text())
    assert d["privacy_unit"] == "example" and d["dataset_fingerprint"] == "f" * 64
    assert d["attempts"] == [{"attempt_id": a.attempt_id, "start": 0}]


def test_ranks_that_prepared_other_data_or_another_mechanism_are_refused(tmp_path):
    """Every process gathers every other's (fingerprint, N, q, sigma, C, unit, ...): one mismatch stops the run
    with one line naming the key; agreeing processes pass."""
    a = build(tmp_path, "a")
    same = a.agreement()
    a.check_ranks_agree([same, dict(same)])  # agreeing ranks pass
    assert a.check_ranks_agree() is None  # a single process gathers itself
    for key, value in (("dataset_fingerprint", "0" * 64), ("num_units", N + 1), ("sample_rate", 0.2),
                       ("noise_multiplier", 9.0), ("max_grad_norm", 2.0), ("privacy_unit", "user")):
        with pytest.raises(UserError, match=f"process 1 disagrees with process 0 on .*{key}"):
            a.check_ranks_agree([same, {**same, key: value}])


def test_plan_is_frozen_and_its_event_is_the_accountants_guarantee(tmp_path):
    """The plan's fields cannot be reassigned; its DP event, composed by Google's PLD accountant called directly,
    gives the epsilon the plan promised (within the accountants' discretisation: a wrong q, sigma or step count moves
    it by far more than 1%), also for a resumed run whose ledger holds a crashed predecessor's discarded steps."""
    import dataclasses

    import dp_accounting

    s = settings(accountant="pld")
    plan = build(tmp_path, "a", s=s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.mechanism = None  # type: ignore[misc]

    def pld(event) -> float:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        return acc.compose(event).get_epsilon(plan.mechanism.delta)

    assert pld(plan.event) == pytest.approx(plan.mechanism.epsilon_planned, rel=1e-2)
    train(plan, 25)
    rp = resume_point(plan, checkpoint_step=20)  # 5 steps after the checkpoint were spent and discarded
    resumed = build(tmp_path, "a", s=s, max_steps=40, resume=rp)
    assert resumed.mechanism.steps == 25 + 20
    assert pld(resumed.event) == pytest.approx(resumed.mechanism.epsilon_planned, rel=1e-2)
    sigma = plan.mechanism.noise_multiplier  # 45 steps cost more than the 40 the checkpoint's step count suggests
    fewer = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(B / N, dp_accounting.GaussianDpEvent(sigma)), 40)
    assert pld(resumed.event) > pld(fewer) * 1.02
    assert build(tmp_path, "n", s=settings(enabled=False)).event is None


def test_gradient_canaries_are_wired_by_the_plan_under_the_mechanisms_rules(tmp_path):
    """The plan builds the canary hook with its own q, sigma and C on the main process only, and refuses gradient
    canaries without privacy and on a resumed run."""
    import torch

    from dpdiff.privacy.gradient_canaries import GradientCanaries

    lin = torch.nn.Linear(4, 3)
    params = [p for p in lin.parameters()]
    kw = dict(params=params, device="cpu", per_sample="hooks", micro_batch_size=4, memory_gb=1.0)
    plan = build(tmp_path, "a")
    eng = plan.engine(lin, gradient_canaries=GradientCanaries(count=5, num_params=15, seed=0), **kw)
    hook = eng.gradient_canaries
    m = plan.mechanism
    assert eng.kind == "hooks"
    assert (hook.noise_multiplier, hook.sample_rate, hook.clip_norm) == (m.noise_multiplier, m.sample_rate, 1.0)
    eng.close()
    worker = PrivacyPlan.build(settings=settings(), dataset=dataset(tmp_path / "data"), num_units=N, batch_size=B,
                               max_steps=60, seed=0, run_dir=tmp_path / "w", rank=1, world_size=2)
    eng = worker.engine(lin, gradient_canaries=GradientCanaries(count=5, num_params=15, seed=0), **kw)
    assert eng.gradient_canaries is None  # the noise is added, and the released sum read, on the main process
    eng.close()
    with pytest.raises(UserError, match="no privacy"):
        build(tmp_path, "n", s=settings(enabled=False)).engine(
            lin, gradient_canaries=GradientCanaries(count=5, num_params=15, seed=0), **kw)
    train(plan, 10)
    resumed = build(tmp_path, "a", resume=resume_point(plan, checkpoint_step=10))
    with pytest.raises(UserError, match="resumed run"):
        resumed.engine(lin, gradient_canaries=GradientCanaries(count=5, num_params=15, seed=0), **kw)


def test_may_step_stops_at_the_planned_steps(tmp_path):
    plan = build(tmp_path, "a", max_steps=3)
    train(plan, 3)
    assert not plan.may_step()
    assert build(tmp_path, "n", s=settings(enabled=False)).may_step()


@pytest.mark.parametrize("per_sample", ["hooks", "bookkeeping", "given"])
def test_the_engine_names_itself_as_the_plan_chose(tmp_path, per_sample):
    """privacy.json's ``engine`` is the built engine's ``kind``: the same as the plan's choice for every mode."""
    import torch

    lin = torch.nn.Linear(4, 3)
    kw = dict(params=list(lin.parameters()), device="cpu", micro_batch_size=4, memory_gb=1.0)
    plan = build(tmp_path, "a")
    eng = plan.engine(lin, per_sample=per_sample, **kw)
    assert eng.kind == plan.engine_kind(per_sample, trainable_numel=15, micro_batch_size=4, memory_gb=1.0)
    assert eng.kind == {"given": "unit_vectors"}.get(per_sample, per_sample)
    eng.close()
    assert build(tmp_path, "n", s=settings(enabled=False)).engine(lin, per_sample=per_sample, **kw).kind == "none"
