"""The report's first section: the facts a privacy officer signs off on, in plain words.

Two readers, two checklists. NIST SP 800-226 (Guidelines for Evaluating Differential Privacy Guarantees,
2025) asks of a DP release: the unit of privacy and the neighbouring relation, epsilon and delta (delta
against 1/N: a delta near 1/N allows releasing one record outright), the sampling actually used, the trust
model, every released artifact, the privacy cost of tuning (runs chosen on the private data), and the
accountant with its numerical error. The EDPB's Opinion 28/2024 on AI models asks whether personal data can
be extracted from the model or membership inferred, with the attacks tried and their strength: here, what
each probe tried, what it found and what it could have found (its detectable epsilon), without claiming more.

Every row is read from the run's files (privacy.json, data_owner.json, probes.json), never recomputed, so the
page says what the run recorded.
"""

from __future__ import annotations


def _f(v, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


#: files of a run dir, and who may see them (README: "The run dir")
PUBLISHED = ("the adapter or UNet weights", "privacy.json (the guarantee and the mechanism)",
             "the model card README.md next to the weights")
OWNER_ONLY = ("data_owner.json (fingerprints, counts, duplicate sets)", "metrics.jsonl (training statistics)",
              "probes.json, probes_history.jsonl and probe_*.png (which images leak)", "run.json and this report",
              "privacy_ledger.json and checkpoints")


def officer_rows(priv: dict, owner: dict | None, probes: dict | None) -> list[tuple[str, str]]:
    """(label, plain sentence) rows: the NIST SP 800-226 facts, then the EDPB attack summary."""
    owner = owner or {}
    dp = bool(priv.get("dp"))
    rows: list[tuple[str, str]] = []
    n = priv.get("num_units")
    unit = priv.get("privacy_unit") or "example"
    if not dp:
        rows.append(("guarantee", "none: this model was trained without differential privacy. Treat the weights "
                                  "as a copy of the training data."))
    else:
        who = ("one person (user): all of a user's images together" if unit == "user" else "one image (example)")
        cap = priv.get("max_images_per_user")
        rows.append(("unit of privacy", f"{who}" + (f", at most {cap} images per user" if unit == "user" and cap
                                                      else "") + "; the guarantee protects each such unit"))
        rows.append(("neighbouring relation", f"{priv.get('neighbouring_relation') or 'add/remove one unit'}: the "
                                              "model is nearly as likely with or without any one unit"))
        eps, delta = priv.get("epsilon"), priv.get("delta")
        rows.append(("guarantee", f"({_f(eps, 4)}, {_f(delta)})-DP for the released weights and anything made "
                                  "from them without the data (samples, post-processing)"))
        if delta is not None and n:
            ratio = float(delta) * int(n)
            ok = ratio < 0.1
            rows.append(("delta against 1/N", f"delta = {_f(delta)}, 1/N = {_f(1 / int(n))} (N = {n} units): "
                                              f"delta x N = {_f(ratio)}" + (
                                                  ", well below 1 (no unit can be released outright)" if ok else
                                                  ": NOT well below 1; a mechanism could release some unit whole "
                                                  "with this delta. Use delta << 1/N")))
        q, steps = priv.get("sample_rate"), priv.get("steps")
        rows.append(("sampling actually used",
                     f"Poisson sampling: each step includes every unit independently with probability {_f(q)} "
                     f"(expected batch {_f(priv.get('expected_batch_size'))} units), {_f(steps)} steps; each unit's "
                     f"gradient clipped to norm {_f(priv.get('max_grad_norm'))} (averaged over "
                     f"{_f(priv.get('augmult'))} augmentation draws first), Gaussian noise of "
                     f"{_f(priv.get('noise_multiplier'))} x that norm added once per step; randomness: "
                     f"{priv.get('noise_source') or 'n/a'}"))
        rows.append(("accountant and its error",
                     f"{priv.get('accountant')}: epsilon {_f(eps, 4)} is an upper bound"
                     + (f" (estimate {_f(priv.get('epsilon_estimate'), 4)}, lower {_f(priv.get('epsilon_lower'), 4)})"
                        if priv.get("epsilon_lower") is not None else "")
                     + (f"; {priv['accountant_note']}" if priv.get("accountant_note") else "")))
        rows.append(("trust model", "central: whoever runs the training sees the raw images; the guarantee covers "
                                    "what is released from the run, not the machine it ran on"))
    rows.append(("released artifacts (publishable)", "; ".join(PUBLISHED)))
    rows.append(("kept by the data owner (outside the guarantee)", "; ".join(OWNER_ONLY)))
    led = owner.get("dataset_ledger") or {}
    if dp and led:
        runs = led.get("runs")
        rows.append(("cost of tuning and of other runs on this data",
                     f"{_f(runs)} DP run(s) on this dataset are recorded in its ledger; together they spent epsilon "
                     f"{_f(led.get('total_epsilon'), 4)} (delta {_f(led.get('delta'))}, {led.get('accountant')}) per "
                     f"{led.get('unit')}. Choosing this run among them on private results costs that total, not "
                     "this run's epsilon alone"))
    elif dp:
        rows.append(("cost of tuning and of other runs on this data",
                     "no dataset ledger recorded: other runs on the same data (sweeps, retries) are not counted "
                     "here; their epsilons add up (dpdiff budget shows them)"))
    rows += attack_rows(probes, claimed=priv.get("epsilon") if dp else None)
    return rows


def attack_rows(probes: dict | None, *, claimed) -> list[tuple[str, str]]:
    """What each probe tried and what it could have seen, in plain words (the EDPB's questions)."""
    if not probes:
        return [("attacks tried", "none: the probes did not run (run dpdiff probe run_dir=...)")]
    out = []
    ov = probes.get("overall") or {}
    if ov.get("verdict"):
        out.append(("attacks: overall", f"{ov['verdict']}: {ov.get('reason')} (attempt {ov.get('attempt')})"))

    def reach(sec: dict) -> str:
        if claimed is None:
            return "the run has no DP claim, so only a demonstrated leak (FAIL) can be concluded"
        det = sec.get("detectable_epsilon")
        if det is None:
            return (f"with these sizes it would not reliably notice a leak even at epsilon {_f(16 * float(claimed))} "
                    "(16x the claim): its silence says little")
        return (f"it would notice (80% of the time) a model leaking like epsilon {_f(det)} or more; "
                + ("that covers twice the claim" if det <= 2 * float(claimed) else
                   f"a leak between the claim {_f(claimed)} and {_f(det)} could go unseen"))

    ex = probes.get("extraction") or {}
    if ex.get("verdict"):
        out.append(("attacks: can training images be extracted?",
                    f"generated {ex.get('generations')} images from the captions of {ex.get('training_items_probed')} "
                    f"training images and {ex.get('heldout_items_probed')} held-out images (never trained on); "
                    f"{ex.get('extracted_count')} training images and {ex.get('control_matches')} held-out images had "
                    f"a near-copy among them. Verdict {ex['verdict']}; {reach(ex)}"))
    mia = probes.get("mia") or {}
    if mia.get("verdict"):
        auc = mia.get("auc")
        out.append(("attacks: can membership be inferred?",
                    f"{len(mia.get('attacks') or {})} attacks ({', '.join(mia.get('attacks') or {})}"
                    + (f"; LiRA: {mia['lira'].get('shadows')} shadow models trained like the run on other units "
                       "(Carlini et al. 2022)" if (mia.get("lira") or {}).get("shadows") else "")
                    + f") scored {mia.get('members')} training units against {mia.get('nonmembers')} held-out ones"
                    + (f"; the pre-declared attack separated them with AUC {_f(auc)} (0.5 = guessing)"
                       if auc is not None else "") + f". Verdict {mia['verdict']}; {reach(mia)}"))
    au = probes.get("audit") or {}
    if au.get("verdict"):
        out.append(("attacks: canary audit",
                    f"{_f(au.get('m'))} canaries, each in training with probability 1/2; the auditor guessed "
                    f"{_f(au.get('num_correct'))} of {_f(au.get('num_guesses'))} right. Verdict {au['verdict']}; "
                    f"{reach(au)}"))
    if not out:
        out.append(("attacks tried", "none ran"))
    return out
