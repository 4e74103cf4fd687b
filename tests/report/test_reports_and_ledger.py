"""Run reports (DP and non-DP), wandb offline, sweeps, and the per-dataset privacy ledger."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

from helpers import SMALL, run_cli, write_image_folder

FAST = SMALL


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.srcs = [], [], []

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.srcs.append(v)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def assert_self_contained_html(path):
    text = path.read_text()
    c = _Checker()
    c.feed(text)
    assert not c.errors and not c.stack, (c.errors, c.stack)
    assert all(s.startswith("data:") for s in c.srcs), c.srcs
    assert not re.search(r"https?://", text)


def test_dp_and_non_dp_reports(tmp_path):
    data = write_image_folder(tmp_path / "data", 16)
    dp, non = tmp_path / "dp", tmp_path / "non"
    r = run_cli("finetune", *FAST, f"data.path={data}", f"hydra.run.dir={dp}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("finetune", *FAST, f"data.path={data}", "privacy=none", f"hydra.run.dir={non}")
    assert r.returncode == 0, r.stderr[-3000:]
    for d in (dp, non):
        assert_self_contained_html(d / "report.html")
    dp_html = (dp / "report.html").read_text()
    assert "differentially private" in dp_html and "NO PRIVACY GUARANTEE" not in dp_html
    assert "epsilon vs step" in dp_html and "Caveats" in dp_html
    assert "For the privacy officer" in dp_html and "delta against 1/N" in dp_html and "@media print" in dp_html
    non_html = (non / "report.html").read_text()
    assert "NO PRIVACY GUARANTEE" in non_html and "nodp" in non_html
    assert "NO PRIVACY GUARANTEE" in (non / "report.md").read_text()
    # rebuildable from the run dir alone
    (dp / "report.html").unlink()
    r = run_cli("report", f"run_dir={dp}")
    assert r.returncode == 0 and (dp / "report.html").exists()


def test_wandb_offline_run_dir(tmp_path):
    data = write_image_folder(tmp_path / "data", 12)
    run = tmp_path / "run"
    r = run_cli("finetune", *FAST, f"data.path={data}", "tracker=wandb", f"hydra.run.dir={run}",
                env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("*.wandb")).read_bytes()  # wandb's offline transaction log (protobuf records)
    for key in (b"privacy/epsilon", b"epsilon", b"target_epsilon"):
        assert key in log, key
    # non-private statistics of the data (losses, gradient norms) stay local unless log_private_data=true
    for key in (b"grad_norm_median", b"clip_fraction", b'"loss"'):
        assert key not in log, key
    assert b"grad_norm_median" in (run / "metrics.jsonl").read_bytes()
    # private data never reaches the tracker: no training caption, no training image
    assert b"a photo number" not in log
    assert not list(runs[0].rglob("*.png"))  # the sample prompts here are training captions


def _wandb_log(root, timeout: float = 30.0) -> bytes:
    """The offline run's .wandb file once wandb's writer has put the summary in it: finish() can return before
    its service process has flushed the file (about 1 run in 8 read it with the header alone)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = list(root.rglob("*.wandb"))
        data = found[0].read_bytes() if found else b""
        if b"privacy/epsilon" in data or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_wandb_gets_data_statistics_only_when_allowed(tmp_path, monkeypatch):
    from dpdiff.training.tracking import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    logs = {}
    for allowed in (False, True):
        t = WandbTracker(tmp_path / str(allowed), config={}, project="t", log_private_data=allowed)
        t.log({"loss": 0.5, "grad_norm_median": 0.1, "epsilon": 1.0, "lr": 1e-3}, step=1)
        t.summary({"privacy/epsilon": 1.0, "probes/mia/auc": 0.7})
        t.finish()
        logs[allowed] = _wandb_log(tmp_path / str(allowed))
    for key in (b"grad_norm_median", b"probes/mia/auc"):
        assert key not in logs[False] and key in logs[True], key
    assert b"privacy/epsilon" in logs[False]


def test_two_run_sweep_report_and_dataset_ledger(tmp_path):
    data = write_image_folder(tmp_path / "data", 16)
    sweep = tmp_path / "sweep"
    r = run_cli("finetune", "-m", *FAST, f"data.path={data}", "privacy.target_epsilon=1,4",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("sweep-report", str(sweep))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (sweep / "sweep_report.md").read_text()
    assert len([ln for ln in md.splitlines() if re.match(r"\| \d+ \|", ln)]) == 2, md
    assert "Total privacy spent by this sweep" in md
    # private selection side by side: more than one run, less than composing its candidates (Papernot & Steinke)
    sel = re.search(r"As a private selection instead .*?epsilon ([0-9.e+]+) at delta .*? against ([0-9.e+]+) for "
                    r"composing 2 such runs and ([0-9.e+]+) for one", md)
    assert sel and float(sel.group(3)) < float(sel.group(1)), md
    assert_self_contained_html(sweep / "sweep_report.html")
    eps = [json.loads((sweep / str(i) / "privacy.json").read_text())["epsilon"] for i in (0, 1)]
    total = float(re.search(r"epsilon ([0-9.]+)", md.split("Total privacy spent")[1]).group(1))
    assert total > max(eps)
    # the dataset ledger composes both runs, for the records both trained on, to more than either alone
    r = run_cli("budget", str(data))
    assert r.returncode == 0, r.stderr
    ledger_total = float(re.search(r"worst-charged record: epsilon ([0-9.]+)", r.stdout).group(1))
    assert ledger_total > max(eps)
    assert r.stdout.count("finished") == 2
    hist = re.findall(r"epsilon +([0-9.]+) +(\d+) records? +\((.*?)\)", r.stdout)
    assert hist[0][2] == "2 attempts" and float(hist[0][0]) == ledger_total, r.stdout
    assert sum(int(n) for _, n, _ in hist) == 16  # every record of the folder, each with its charge
    # held-out records were never trained on: they carry no charge
    held_out = json.loads((sweep / "0" / "data_owner.json").read_text())["holdout_units"]
    assert sum(int(n) for e, n, what in hist if what.startswith("new")) == held_out, r.stdout
    # and a run past the dataset budget is refused before training
    run = tmp_path / "over"
    r = run_cli("finetune", *FAST, f"data.path={data}", "privacy.target_epsilon=2",
                f"privacy.dataset_budget={ledger_total + 0.01}", f"hydra.run.dir={run}")
    assert r.returncode == 2 and "privacy.dataset_budget" in r.stderr
    assert not run.exists()
    # a run that fails during setup (here: a bad option found with the model loaded) trained nothing
    # and leaves no planned entry charged to the dataset
    r = run_cli("finetune", *FAST, f"data.path={data}", "train.timestep_range=[900,100]", f"hydra.run.dir={run}")
    assert r.returncode == 2 and "timestep_range" in r.stderr
    r = run_cli("budget", str(data))
    assert r.stdout.count("finished") == 2 and "planned" not in r.stdout, r.stdout
