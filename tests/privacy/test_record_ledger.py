"""The per-record dataset ledger: each record is charged the runs that trained on it, composed."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import threading
import time

import dp_accounting
import numpy as np
import pytest
from helpers import write_image_folder

from dpdiff.data.records import RecordIds, fingerprint, record_ids
from dpdiff.errors import UserError
from dpdiff.privacy.accountants import MechanismSegment, get_accountant
from dpdiff.privacy.dataset_ledger import (
    DatasetLedger,
    compose_runs,
    folder_key,
    ledger_location,
    record_charges,
)
from dpdiff.privacy.plan import DatasetIdentity, PrivacyPlan, ResumePoint
from dpdiff.privacy.settings import PrivacySettings

N, B, SIGMA, DELTA = 200, 20, 1.0, 1e-4  # q = 0.1


def settings(**kw) -> PrivacySettings:
    base = dict(enabled=True, target_epsilon=None, delta=DELTA, max_grad_norm=1.0, accountant="rdp", augmult=1,
                unit="example", max_images_per_user=None, noise_multiplier=SIGMA, reproducible_noise=False,
                secure_rng=False, dataset_budget=None, dataset_delta=None, dataset_ledger=None)
    base.update(kw)
    return PrivacySettings(**base)


def digest(i: int) -> bytes:
    return hashlib.sha256(f"image {i}".encode()).digest()


def ids(rng, users: dict[int, str] | None = None) -> RecordIds:
    rng = list(rng)
    return RecordIds(digests=tuple(digest(i) for i in rng),
                     users=tuple(users[i] for i in rng) if users is not None else None)


def run(tmp_path, name: str, records: RecordIds, *, steps: int = 5, finish: bool = True, **kw) -> PrivacyPlan:
    """A run of ``steps`` steps at sigma 1, q 0.1 on ``records``: planned, trained, finished."""
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    plan = PrivacyPlan.build(settings=settings(**kw), num_units=N, batch_size=B, max_steps=steps, seed=0,
                             run_dir=tmp_path / name,
                             dataset=DatasetIdentity(root=root, fingerprint=name, source_fingerprint=name,
                                                     record_ids=records))
    plan.dataset_charge.charge(status="planned")
    if finish:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(steps):
            assert plan.may_step()
            plan.record_step()
        plan.dataset_charge.charge(status="finished")
    return plan


def ledger(tmp_path) -> DatasetLedger:
    return DatasetLedger(ledger_location(data_root=tmp_path / "data"))


def eps(steps: int) -> float:
    return get_accountant("rdp").epsilon(history=[MechanismSegment(SIGMA, B / N, steps)], delta=DELTA).epsilon


def charges(tmp_path, records, **kw):
    led = ledger(tmp_path)
    return record_charges(led, led.entries(), records, delta=DELTA, accountant="rdp", **kw)


def test_growing_dataset_old_records_carry_both_runs_new_ones_one(tmp_path):
    """Run A on 10 images, run B on those 10 plus 5 new: the 10 carry A and B composed, the 5 carry B only."""
    a = run(tmp_path, "a", ids(range(10)))
    b = run(tmp_path, "b", ids(range(15)))
    entries = {e.attempt_id: e for e in ledger(tmp_path).entries()}
    ea, eb = entries[a.attempt_id], entries[b.attempt_id]
    both = compose_runs([ea, eb], delta=DELTA, accountant="rdp")["epsilon"]
    assert both > max(ea.epsilon, eb.epsilon) and ea.epsilon == pytest.approx(eps(5))
    # independently of dpdiff's accountants: RDP of the 10 steps the old records were trained in
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        B / N, dp_accounting.GaussianDpEvent(SIGMA)), 10)
    assert both == pytest.approx(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(DELTA), rel=0.03)
    # what the run's report gets: the worst record, and the records carrying each charge
    total = b.dataset_charge.total
    assert total["epsilon"] == pytest.approx(both) and total["runs"] == 2 and total["records"] == 15
    assert [(h["records"], h["runs"]) for h in total["records_charged"]] == [(10, 2), (5, 1)]
    assert total["records_charged"][1]["epsilon"] == pytest.approx(eb.epsilon)
    assert total["new_records"] == 5
    # the folder as it is now: 2 more new images, 3 of the old ones removed (they keep their charge)
    ch = charges(tmp_path, ids([*range(3, 15), 100, 101]))
    assert [(c.records, c.absent, len(c.attempts)) for c in ch.charges] == [(7, 3, 2), (5, 0, 1), (2, 0, 0)]
    assert ch.worst.epsilon == pytest.approx(both) and ch.new_records == 2
    assert ch.absent == 3 and ch.absent_worst == pytest.approx(both)
    assert ch.touching == {a.attempt_id: 7, b.attempt_id: 12}


def test_ledger_stores_keyed_ids_only(tmp_path):
    a = run(tmp_path, "a", ids(range(15)))
    led = ledger(tmp_path)
    salt_file = led.salt_path(led.path)
    salt = salt_file.read_bytes()
    assert len(salt) == 32 and stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    (e,) = led.entries()
    assert e.record_set["records"] == 15 and e.status == "finished"
    side = led.records_dir(led.path) / e.record_set["file"]
    assert side.name == f"{a.attempt_id}.npy" and stat.S_IMODE(side.stat().st_mode) == 0o600
    stored = np.load(side)
    assert stored.dtype == np.dtype("S16") and list(stored) == sorted(stored)
    keyed = sorted(hashlib.blake2b(digest(i), key=salt, digest_size=16).digest() for i in range(15))
    assert [bytes(x).ljust(16, b"\0") for x in stored] == keyed
    raw = {digest(i)[:16] for i in range(15)}
    assert not raw & {bytes(x).ljust(16, b"\0") for x in stored}  # the content hashes are not in the set
    text = led.path.read_text()
    assert all(digest(i).hex()[:16] not in text for i in range(15))
    assert max(len(line) for line in text.splitlines()) < 1500  # the lines stay small; the set is stored once
    # without the salt, the set names nothing: it is then charged to every record, conservatively
    salt_file.unlink()
    ch = record_charges(DatasetLedger(led.location), led.entries(), ids(range(100, 103)), delta=DELTA,
                        accountant="rdp")
    assert ch.new_records == 0 and ch.worst.epsilon == pytest.approx(eps(5)) and len(ch.legacy) == 1


def test_old_entries_without_a_record_set_charge_every_record(tmp_path):
    run(tmp_path, "a", ids(range(10)))
    led = ledger(tmp_path)
    (e,) = led.entries()
    old = {k: v for k, v in e.to_dict().items() if k != "record_set"}
    old.update(attempt_id="old", seq=1)
    with open(led.path, "a") as f:
        f.write(json.dumps(old) + "\n")
    ch = charges(tmp_path, ids(range(5, 20)))
    assert ch.new_records == 0 and [e.attempt_id for e in ch.legacy] == ["old"]
    assert [(c.records, len(c.attempts)) for c in ch.charges] == [(5, 2), (10, 1)]
    assert ch.worst.epsilon == pytest.approx(eps(10))
    # a run on records A never touched is still charged the old entry
    b = run(tmp_path, "b", ids(range(20, 25)))
    assert b.dataset_charge.total["epsilon"] == pytest.approx(eps(10))
    assert "conservatively" in b.dataset_charge.total["note"] and b.dataset_charge.total["legacy_attempts"] == 1


def test_dataset_budget_is_per_record(tmp_path):
    """A budget that A's records cannot take twice: a run on other records passes, a run on A's is refused."""
    run(tmp_path, "a", ids(range(10)))
    budget = (eps(5) + eps(10)) / 2  # above one run, below two composed
    c = run(tmp_path, "c", ids(range(10, 20)), dataset_budget=budget)
    assert c.dataset_charge.total["epsilon"] == pytest.approx(eps(5))
    with pytest.raises(UserError) as err:
        run(tmp_path, "d", ids(range(15, 25)), dataset_budget=budget)  # 5 of c's records
    msg = str(err.value)
    assert f"privacy.dataset_budget={budget:g}" in msg and "most-charged training record" in msg
    assert f"epsilon {eps(10):.3f}" in msg and "5 of its 10 training records" in msg
    assert len(ledger(tmp_path).entries()) == 2  # the refused run left no line


def test_mixed_privacy_units_are_refused(tmp_path):
    users = {i: f"u{i % 4}" for i in range(40)}
    run(tmp_path, "a", ids(range(10), users))
    with pytest.raises(UserError, match=r"privacy.unit=user: 5 of this run's 10 training records .*per example"
                                        r".*privacy.dataset_ledger=PATH"):
        run(tmp_path, "b", ids(range(5, 15), users), unit="user")
    run(tmp_path, "c", ids(range(20, 30), users), unit="user")  # records A never touched: nothing to compose
    entries = ledger(tmp_path).entries()
    total = compose_runs(entries, delta=DELTA, accountant="rdp")
    assert total["epsilon"] == float("inf") and total["unit"] == "mixed" and "per example and per user" in total["note"]
    assert compose_runs(entries[:1], delta=DELTA, accountant="rdp")["epsilon"] == pytest.approx(eps(5))


def test_user_level_runs_charge_every_record_of_their_users(tmp_path):
    """A user-level run on u0's old image charges u0's image added later; an example-level set would not."""
    users = {0: "u0", 1: "u1", 2: "u0"}
    run(tmp_path, "a", ids([0, 1], users), unit="user")
    ch = charges(tmp_path, ids([0, 1, 2], users))
    assert [(c.records, len(c.attempts)) for c in ch.charges] == [(3, 1)]
    b = run(tmp_path, "b", ids([1], users), unit="user", steps=3)
    ch = charges(tmp_path, ids([0, 1, 2], users))
    assert [(c.records, len(c.attempts)) for c in ch.charges] == [(1, 2), (2, 1)]
    assert ch.worst.epsilon == pytest.approx(eps(8))
    assert b.dataset_charge.total["epsilon"] == pytest.approx(eps(8))


def test_a_non_private_run_charges_only_its_own_records_and_a_budget_refuses_it(tmp_path):
    """privacy=none leaves no finite guarantee, on the records it trained on only (its record set is stored like a
    DP run's); under privacy.dataset_budget it is refused before training."""
    run(tmp_path, "none", ids(range(10)), enabled=False)
    (entry,) = ledger(tmp_path).entries()
    assert entry.record_set["records"] == 10
    ch = charges(tmp_path, ids(range(20)))
    assert sorted((c.records, c.epsilon) for c in ch.charges) == [(10, 0.0), (10, float("inf"))]
    with pytest.raises(UserError, match="privacy.dataset_budget=5"):
        run(tmp_path, "none2", ids(range(20, 30)), enabled=False, dataset_budget=5.0)


def test_failed_and_crashed_attempts(tmp_path):
    # a non-private run that failed before training charges nothing (no infinite total left behind)
    p = run(tmp_path, "none", ids(range(10)), finish=False, enabled=False)
    assert p.dataset_charge.total["epsilon"] == float("inf")
    p.dataset_charge.release()
    ch = charges(tmp_path, ids(range(10)))
    assert ch.new_records == 10 and ch.worst.epsilon == 0
    # a crash after 3 of 8 planned steps: until corrected, 8 count
    c = run(tmp_path, "c", ids(range(10)), steps=8, finish=False)
    c.run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        c.record_step()
    c.save_ledger()
    assert charges(tmp_path, ids(range(10))).worst.epsilon == pytest.approx(eps(8))
    state = {"step": 3, **c.state_dict()}
    d = PrivacyPlan.build(settings=settings(), num_units=N, batch_size=B, max_steps=5, seed=0,
                          run_dir=tmp_path / "d", dataset=c.dataset,
                          resume=ResumePoint.from_checkpoint(path=c.run_dir / "checkpoint-3", state=state))
    d.dataset_charge.charge(status="planned")
    e = {x.attempt_id: x for x in ledger(tmp_path).entries()}[c.attempt_id]
    assert e.status == "ended" and e.steps == 3 and e.record_set["records"] == 10  # corrected, same record set
    assert charges(tmp_path, ids(range(12))).worst.epsilon == pytest.approx(eps(5))  # 3 + 2 planned


def test_concurrent_runs_cannot_both_pass_the_budget(tmp_path, monkeypatch):
    """Two runs on the same records race for a budget only one fits: the lock lets exactly one through, even
    when both read the ledger before either writes (a slow read widens the window)."""
    run(tmp_path, "warm", ids(range(100, 101)))  # the ledger exists
    budget = (eps(5) + eps(10)) / 2
    original = DatasetLedger.entries

    def slow_entries(self, *a, **k):
        out = original(self, *a, **k)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(DatasetLedger, "entries", slow_entries)
    start, results = threading.Barrier(2), {}

    def go(name):
        start.wait()
        try:
            run(tmp_path, name, ids(range(10)), finish=False, dataset_budget=budget)
            results[name] = "ok"
        except UserError as err:
            results[name] = str(err)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r == "ok" for r in results.values()) == [False, True], results
    assert "privacy.dataset_budget" in next(r for r in results.values() if r != "ok")
    monkeypatch.undo()
    assert charges(tmp_path, ids(range(10))).worst.epsilon == pytest.approx(eps(5))


def test_home_ledger_is_keyed_by_folder_not_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDIFF_HOME", str(tmp_path / "home"))
    root = tmp_path / "ro"
    root.mkdir()
    monkeypatch.setattr("dpdiff.privacy.dataset_ledger.os.access", lambda p, mode: False)
    a, b = (ledger_location(data_root=root, source_fingerprint=fp) for fp in ("1" * 64, "2" * 64))
    assert a.write == b.write == tmp_path / "home" / "ledgers" / f"{folder_key(root)}.jsonl"
    assert folder_key(root) == hashlib.sha256(str(root.resolve()).encode()).hexdigest()
    assert tmp_path / "home" / "ledgers" / f"{'1' * 64}.jsonl" in a.read  # where earlier versions wrote


def test_prepared_data_train_record_ids(tmp_path):
    from dataclasses import replace

    from dpdiff.data.prepare import prepare
    from dpdiff.schema import compose
    from dpdiff.settings import DataSettings

    root = write_image_folder(tmp_path / "data", 10, users=3)
    data = prepare(DataSettings.from_config(compose([f"data.path={root}", "data.holdout_fraction=0.2"]).data),
                   unit="example")
    rid = data.train_record_ids()
    members = data.member_records()
    assert len(rid) == len(members) == 8 and rid is data.train_record_ids()  # computed once
    assert list(rid.digests) == [hashlib.sha256(data.records[i].path.read_bytes()).digest() for i in members]
    assert rid.users == tuple(data.records[i].user_id for i in members)
    assert replace(data, canary_records=[members[0]]).train_record_ids().digests == rid.digests[1:]
    every = record_ids(data.records)
    assert fingerprint(data.records, ids=every) == fingerprint(data.records) == data.fingerprint


def test_budget_command_reports_records_per_charge(tmp_path, capsys):
    from dpdiff.data.prepare import prepare
    from dpdiff.report.cli import budget_command
    from dpdiff.schema import compose
    from dpdiff.settings import DataSettings

    def data_run(name: str):
        data = prepare(DataSettings.from_config(compose([f"data.path={root}", "data.holdout_fraction=0"]).data),
                       unit="example")
        plan = PrivacyPlan.build(settings=settings(), num_units=N, batch_size=B, max_steps=5, seed=0,
                                 run_dir=tmp_path / name,
                                 dataset=DatasetIdentity(root=data.root, fingerprint=data.fingerprint,
                                                         source_fingerprint=data.source_fingerprint,
                                                         record_ids=data.train_record_ids))
        plan.dataset_charge.charge(status="planned")
        return plan

    root = write_image_folder(tmp_path / "data", 10)
    data_run("a")
    write_image_folder(root, 15)  # the same 10 images and 5 new ones
    data_run("b")
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    write_image_folder(tmp_path / "more", 1, seed=7)
    (root / "new.png").write_bytes((tmp_path / "more" / "img_000.png").read_bytes())
    rows = rows[2:] + [{"file_name": "new.png", "text": "new"}]  # 2 old images gone, 1 new
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    budget_command(str(root), accountant="rdp")
    out = capsys.readouterr().out
    assert out.count("planned") == 2
    assert re.search(r"records +10 \(8 here\)", out) and re.search(r"records +15 \(13 here\)", out), out
    worst = float(re.search(r"worst-charged record: epsilon ([0-9.]+) at delta", out).group(1))
    assert worst == pytest.approx(eps(10), rel=1e-3)
    hist = re.findall(r"epsilon +([0-9.]+) +(\d+) records? +\((.*?)\)", out)
    assert [(n, what) for _, n, what in hist] == [("8", "2 attempts"), ("5", "1 attempt"),
                                                  ("1", "new: no run trained on them")]
    assert float(hist[1][0]) == pytest.approx(eps(5), rel=1e-3)
    assert re.search(r"absent from the folder now: 2 \(worst epsilon ([0-9.]+)\)", out)
    assert len(out.splitlines()) < 25
    # a record trained on per example and per user (here through an entry of before per-record ledgers, which
    # charges every record): no finite epsilon is claimed for it, and the output says why
    led = DatasetLedger(ledger_location(data_root=root))
    old = {**led.entries()[0].to_dict(), "attempt_id": "old", "privacy_unit": "user", "seq": 1, "record_set": None}
    with open(led.path, "a") as f:
        f.write(json.dumps(old) + "\n")
    budget_command(str(root), accountant="rdp")
    out = capsys.readouterr().out
    assert "worst-charged record: epsilon inf" in out and "per example and per user" in out
    assert "charged to every record, conservatively" in out and "units mixed" in out
    hist = re.findall(r"epsilon +([0-9.inf]+) +(\d+) records? +\((.*?)\)", out)
    assert hist[:2] == [("inf", "8", "3 attempts"), ("inf", "5", "2 attempts")], out
    assert hist[2][1:] == ("1", "1 attempt") and "no record is new" in out
