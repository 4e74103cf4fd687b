"""``dpdiff report``: rebuild a run's report from its run dir."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from dpdiff.errors import UserError


def report_command(run_dir: str) -> None:
    run_dir = Path(str(run_dir)).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    from dpdiff.report.run_report import write_run_report

    html, md = write_run_report(run_dir)
    print(f"wrote {html} and {md}")


def sweep_report_command(path: str) -> None:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    from dpdiff.report.sweep import write_sweep_report

    html_path, md_path = write_sweep_report(root)
    print(f"wrote {html_path} and {md_path}")
    print(md_path.read_text())


def budget_command(dataset: str, *, ledger: str | None = None, delta: float | None = None,
                   accountant: str | None = None, caption_column: str = "text") -> None:
    """``dpdiff budget DATASET [--ledger PATH] [--delta D] [--accountant prv|pld|rdp]``: per record, what every run
    recorded in the dataset's ledger has spent (see ``dpdiff.privacy.dataset_ledger``)."""
    from dpdiff.privacy.accountants import DEFAULT_ACCOUNTANT

    opts = {"ledger": ledger, "delta": delta, "accountant": accountant or DEFAULT_ACCOUNTANT,
            "caption_column": caption_column}
    pos = [dataset]
    from dpdiff.data.formats import read_dataset
    from dpdiff.data.prepare import resolve_data_path
    from dpdiff.data.records import RecordIds, fingerprint, record_ids
    from dpdiff.privacy.dataset_ledger import DatasetLedger, ledger_location, record_charges

    def show(eps: float) -> str:
        return "inf" if eps == float("inf") else f"{eps:.4g}"

    root, _ = resolve_data_path(pos[0] if pos[0] not in ("digits", "builtin") else None)
    records = read_dataset(root, caption_column=opts["caption_column"])
    ids = record_ids(records)  # each image read once: the ids and the folder's fingerprint
    fp = fingerprint(records, ids=ids)
    users = tuple(str(r.user_id) if r.user_id else None for r in records)
    current = RecordIds(digests=tuple(ids), users=users if any(users) else None)
    ledger = DatasetLedger(ledger_location(data_root=root, source_fingerprint=fp, configured=opts["ledger"]))
    entries = ledger.entries()
    print(f"dataset {root} ({len(records)} records, fingerprint {fp[:16]}...)")
    if not entries:
        print("no run has been recorded on this dataset: nothing spent")
        return
    delta = float(opts["delta"]) if opts["delta"] else max((e.delta for e in entries if e.delta), default=1e-5)
    ch = record_charges(ledger, entries, current, delta=delta, accountant=opts["accountant"])
    legacy = {e.attempt_id for e in ch.legacy}
    print(f"ledger {ledger.path}")
    shown_entries = entries[-15:]
    if len(entries) > len(shown_entries):
        print(f"  ({len(entries) - len(shown_entries)} earlier attempts not listed)")
    for e in shown_entries:
        eps = "NO DP (unbounded)" if not e.dp else f"{e.epsilon:.4g}" if e.epsilon is not None else "?"
        flag = " (reproducible noise)" if e.reproducible_noise else ""
        if e.procedure:
            flag += (f" (tuning procedure: its score releases; it and its {len(e.procedure.get('candidates') or [])} "
                     "candidates are charged together as one private selection)")
        if e.attempt_id in legacy:
            recs = "all*"
        else:
            n = int((e.record_set or {}).get("records") or 0)
            recs = f"{n} ({ch.touching.get(e.attempt_id, 0)} here)"
        print(f"  {e.time}  {e.status:8s}  epsilon {eps:>10s}  steps {e.steps:6d}  {e.privacy_unit:7s}  "
              f"records {recs:>13s}  {e.run_dir}{flag}")
    if legacy:
        print(f"  * {len(legacy)} attempt(s) without a readable record set (recorded before per-record ledgers, or "
              "its set was deleted): charged to every record, conservatively")
    worst = ch.worst.total
    print(f"worst-charged record: epsilon {show(worst['epsilon'])} at delta {delta:.3g} ({worst['runs']} attempts "
          f"composed, {worst.get('accountant', '')}, "
          f"{'units mixed' if worst['unit'] == 'mixed' else 'per ' + worst['unit']})"
          + (f"; {worst['note']}" if worst.get("note") else "")
          + (f"; {worst['selection_procedures']} tuning procedure(s) charged as private selections, by RDP"
             if worst.get("selection_procedures") else ""))
    print("records carrying each charge (worst first):")
    rows: dict[tuple[str, int], int] = {}
    for h in ch.histogram():
        key = (show(h["epsilon"]), h["runs"])
        rows[key] = rows.get(key, 0) + h["records"]
    items = list(rows.items())
    for (eps, runs), count in items[:8]:
        what = "new: no run trained on them" if runs == 0 else f"{runs} attempt{'s' if runs != 1 else ''}"
        print(f"  epsilon {eps:>8s}  {count:7d} record{'s' if count != 1 else ' '}  ({what})")
    if len(items) > 8:
        rest = items[8:]
        print(f"  ... {len(rest)} more charges over {sum(c for _, c in rest)} records (epsilon <= {rest[0][0][0]})")
    if not ch.new_records:
        print("  no record is new (every record of the folder was charged by at least one attempt)")
    absent = f"{ch.absent}" + (f" (worst epsilon {show(ch.absent_worst)})" if ch.absent_worst is not None else "")
    print(f"ledger-known records absent from the folder now: {absent}")


def plan_command(*, overrides: list[str], units: int | None = None, trainable: int | None = None,
                 minutes: float | None = None, rows_per_second: float = 60.0, search_scale: int | None = None) -> None:
    """``dpdiff plan [--units N] [--trainable D] [--minutes M [--rows-per-second R]] [--search-scale K]
    [OVERRIDE ...]``: the finetune config composed with the same overrides (its data, privacy, adapter, model and
    train keys and defaults); the compute budget is the config's ``train.max_steps x train.batch_size x
    privacy.augmult`` rows unless ``--minutes`` is given. ``--search-scale K`` adds a hyper-parameter search
    configuration at 1/K of the batch and the same sigma/B (:func:`dpdiff.privacy.planning.search_plan`)."""
    from dpdiff.models.adapters import count_trainable
    from dpdiff.privacy.planning import assess, plan_grid, units_per_prompt
    from dpdiff.privacy.settings import default_delta
    from dpdiff.schema import compose

    cfg = compose(overrides)
    priv, tr, ad, data = cfg.privacy, cfg.train, cfg.adapter, cfg.data
    if not priv.get("enabled", True):
        raise UserError("privacy=none adds no noise: there is no mechanism to plan (drop privacy=none)")
    unit = str(priv.get("unit", "example"))
    captions = None
    if units is None:
        from dpdiff.data.formats import read_dataset
        from dpdiff.data.prepare import resolve_data_path
        from dpdiff.data.records import group_units

        root, _ = resolve_data_path(data.get("path"))
        records = read_dataset(root, caption_column=str(data.get("caption_column", "text")))
        from dpdiff.data.records import split_holdout

        grouped = group_units(records, unit=unit)
        # the units dpdiff finetune trains on (and calibrates sigma for): the same seeded holdout split off
        train, hold = split_holdout(grouped, fraction=float(data.get("holdout_fraction", 0.0) or 0.0),
                                    seed=int(data.get("split_seed", 0) or 0))
        n = len(train)
        captions = [records[grouped.members[i][0]].text for i in train]
        where = (f"{root} ({len(records)} images, {len(grouped)} {unit} units, {n} to train on after the "
                 f"{len(hold)}-unit holdout)")
    else:
        if units < 1:
            raise UserError(f"--units must be >= 1, got {units}")
        n = int(units)
        where = f"{n} privacy units (given)"
    eps = float(priv.target_epsilon)
    delta = float(priv.delta) if priv.get("delta") else default_delta(n)
    k = int(priv.get("augmult", 1) or 1)
    c = float(priv.max_grad_norm)
    accountant = str(priv.get("accountant", "prv"))
    if trainable:
        d = int(trainable)
    else:
        tm = ad.get("target_modules")
        d = count_trainable(pretrained=cfg.model.get("pretrained"), kind=str(ad.kind), rank=int(ad.get("rank") or 4),
                            target_modules=list(tm) if tm else None)
    if str(ad.kind) == "embedding" and str(ad.get("mechanism", "dpsgd")) == "aggregate":
        # one Gaussian mechanism over every unit (q = 1, one step): no batch/steps grid to search
        from dpdiff.privacy.planning import candidate

        row = candidate(num_units=n, batch_size=n, steps=1, target_epsilon=eps, delta=delta, accountant=accountant,
                        trainable=d, max_grad_norm=c, augmult=1)
        print(f"dataset   : {where}")
        print(f"budget    : epsilon {eps:g} at delta {delta:.2g} ({accountant}); adapter=embedding, aggregate: one "
              "release of every unit's clipped embedding offset")
        print(f"mechanism : sigma {row.noise_multiplier:.3f}; noise std per coordinate of the mean offset "
              f"{row.noise_std_per_coordinate:.3g} (C={c:g}, N={n}); noise/signal {row.nsr_run:.3g} over {d} weights")
        for w in assess(nsr_run=row.nsr_run, units_per_prompt=None):
            print(f"warning: {w}")
        return
    if search_scale is not None and search_scale < 2:
        raise UserError(f"--search-scale must be at least 2 (the batch is divided by it), got {search_scale}")
    own = None  # the schedule dpdiff finetune would run with these overrides
    if minutes is not None:
        if minutes <= 0 or rows_per_second <= 0:
            raise UserError("--minutes and --rows-per-second must be positive")
        rows = int(minutes * 60 * rows_per_second)
        budget = f"{minutes:g} minutes at {rows_per_second:g} rows/s = {rows} rows"
    else:
        from dpdiff.privacy.planning import auto_schedule

        auto = auto_schedule(num_units=n) if "auto" in (str(tr.batch_size), str(tr.max_steps)) else {}
        b = int(auto["batch_size"] if str(tr.batch_size) == "auto" else float(tr.batch_size))
        steps = int(auto["max_steps"] if str(tr.max_steps) == "auto" else tr.max_steps)
        rows = steps * b * k
        own = (b, steps)
        budget = f"train.max_steps={steps} x train.batch_size={b} x augmult {k} = {rows} rows (or --minutes M)"
    grid = plan_grid(num_units=n, target_epsilon=eps, delta=delta, rows_budget=rows, trainable=d,
                     max_grad_norm=c, augmult=k, accountant=accountant)
    best = grid[0]
    upp = units_per_prompt(captions or [])
    print(f"dataset   : {where}")
    print(f"budget    : epsilon {eps:g} at delta {delta:.2g} ({accountant}); {budget}")
    print(f"trainable : {d:,} weights; clipping bound C={c:g}; K={k}")
    print("\n  batch   steps        q   sigma  noise std/coord  noise/signal per step  over the run")
    for r in sorted(grid, key=lambda r: r.batch_size):
        mark = "  <- recommended" if r is best else ""
        print(f"  {r.batch_size:5d}  {r.steps:6d}  {r.sample_rate:7.4f}  {r.noise_multiplier:6.3f}  "
              f"{r.noise_std_per_coordinate:15.3g}  {r.nsr_step:21.3g}  {r.nsr_run:12.3g}{mark}")
    print(f"\nrecommended: train.batch_size={best.batch_size} train.max_steps={best.steps} (sigma "
          f"{best.noise_multiplier:.3f}, epsilon {best.epsilon:.3f})")
    warnings = assess(nsr_run=best.nsr_run, units_per_prompt=upp)
    for w in warnings:
        print(f"warning: {w}")
    if warnings and str(ad.kind) != "embedding":
        _suggest_embedding(cfg, n=n, eps=eps, delta=delta, rows=rows, c=c, k=k, accountant=accountant, d=d,
                           nsr_run=best.nsr_run)
    if search_scale is not None:
        from dpdiff.privacy.planning import candidate

        full = best if own is None else next(
            (r for r in grid if (r.batch_size, r.steps) == own), None) or candidate(
            num_units=n, batch_size=own[0], steps=own[1], target_epsilon=eps, delta=delta, accountant=accountant,
            trainable=d, max_grad_norm=c, augmult=k)
        _print_search(full, scale=search_scale, n=n, delta=delta, accountant=accountant,
                      configured=own is not None)
    if captions is not None:
        print("(units per prompt were counted from the captions: private data, read locally only)")


def _print_search(full, *, scale: int, n: int, delta: float, accountant: str, configured: bool) -> None:
    """The scaled-down search configuration beside the full-size one it extrapolates to (TAN)."""
    from dpdiff.privacy.planning import search_plan

    sp = search_plan(full, scale=scale, num_units=n, delta=delta, accountant=accountant)
    which = "the config's schedule" if configured else "the recommended schedule"
    eps = f"{sp.search_epsilon:.3g}" if math.isfinite(sp.search_epsilon) else "unbounded"
    print(f"\ncheap search at 1/{scale} of the batch, the same sigma/B and steps (Sander et al. 2023: at fixed "
          "steps utility tracks sigma/B):")
    print(f"  full size : {' '.join(sp.full_overrides())}  sigma {full.noise_multiplier:.4g}, epsilon "
          f"{full.epsilon:.3g}  ({which}; sigma/B {full.noise_multiplier / full.batch_size:.4g})")
    print(f"  search    : {' '.join(sp.search_overrides())}  ({sp.compute_ratio:.3g} of the rows a candidate)")
    print(f"  each search run trained on these {n} units spends epsilon {eps} at delta {delta:.2g}: it simulates the "
          "full run's noise, it does not protect; dpdiff finetune charges it to the dataset ledger like any run. "
          "Search on data you may spend freely (data.path=PUBLIC_SET of the same kind), then train the winner's "
          "hyper-parameters once at full size with the full-size keys above.")


def _suggest_embedding(cfg, *, n: int, eps: float, delta: float, rows: int, c: float, k: int, accountant: str,
                       d: int, nsr_run: float) -> None:
    """When the plan warns, what the embedding adapter's noise-to-signal would be at the same budget (SD 1.x/2.x)."""
    from dpdiff.models.adapters import count_trainable
    from dpdiff.privacy.planning import plan_grid

    try:
        emb = count_trainable(pretrained=cfg.model.get("pretrained"), kind="embedding", rank=None, target_modules=None)
        alt = plan_grid(num_units=n, target_epsilon=eps, delta=delta, rows_budget=rows, trainable=emb,
                        max_grad_norm=c, augmult=k, accountant=accountant)[0]
    except UserError:  # not an SD 1.x/2.x base, or no batch size fits: nothing to suggest
        return
    if alt.nsr_run < nsr_run:
        print(f"suggestion: for a look or a concept from few images, the embedding adapter trains one token "
              f"({emb:,} weights instead of {d:,}): noise/signal over the run {alt.nsr_run:.3g} instead of "
              f"{nsr_run:.3g} at this budget: dpdiff finetune experiment=private_look ... (prompt with its token). "
              "Measured beside DP-LoRA on 100 images of the tiny base it did no better "
              "(benchmarks/results/small_data.md): try both")


def clean_command(run_dirs: list[str], *, cache_only: bool = False, yes: bool = False, ask=None) -> list[str]:
    """Remove the cached private features (encoded training images) and, for each run dir given, its checkpoints
    (and a run-local cache). Everything to delete is listed first; without ``yes`` the user is asked (``ask``:
    a function of the question returning the answer, default ``input`` on a terminal) and a non-interactive
    call without ``yes`` deletes nothing. Returns what was removed."""
    import sys

    from dpdiff.training.encode import FeatureCache

    targets: list[Path] = []
    cache = FeatureCache.default().root  # what every run caches unless data.cache_dir says otherwise
    if cache.exists():
        targets.append(cache)
    if not cache_only:
        for a in run_dirs:
            run = Path(a).expanduser()
            if not (run / "privacy.json").exists() and not list(run.glob("checkpoint-*")):
                raise UserError(f"{run} is not a dpdiff run dir (no privacy.json or checkpoints); nothing deleted")
            targets += sorted(run.glob("checkpoint-*")) + sorted(run.glob("cache"))
    elif run_dirs:
        raise UserError("--cache deletes only the feature cache: drop the run dirs, or --cache")
    if not targets:
        print("removed: nothing to remove")
        return []
    print("to delete:\n  " + "\n  ".join(str(t) for t in targets))
    if not yes:
        if ask is None:
            if not sys.stdin.isatty():
                raise UserError("dpdiff clean deletes files: pass --yes to confirm (nothing deleted)")
            ask = input
        if str(ask("delete these? [y/N] ")).strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return []
    for t in targets:
        shutil.rmtree(t)
    print("removed: " + ", ".join(str(t) for t in targets))
    return [str(t) for t in targets]
