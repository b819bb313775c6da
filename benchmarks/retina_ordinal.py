"""Diabetic-retinopathy grading on RetinaMNIST: plain cross-entropy against each ordinal option, same plan
and seeds, in one run, plus a soft ensemble of the four heads per seed.

Every run is `medsight train --data data/retinamnist.npz --set data.task=ordinal --set train.ordinal=HEAD
--set train.monitor=qwk --set train.seed=S` (everything else from the plan), so any row can be repeated by
hand. Targets (issue "Grading is ordinal"), means of 3 seeds on a 2-core CPU, each run at most 5 minutes:
the best ordinal option's test QWK >= cross-entropy's + 0.05, and its test ACC >= 0.531 and AUC >= 0.750
(Google AutoML Vision's published 28-px figures; ResNet-18 (28) is 0.524 / 0.717); the referable-DR
(grade >= 2) sensitivity at the validation-chosen threshold is reported with its interval and specificity.

Run folders are kept in benchmarks/runs/retina_ordinal/HEAD-seedS; a finished run there is read, not trained
again, and the results file is rewritten after every run, so an interrupted benchmark resumes.

    python benchmarks/retina_ordinal.py                   # seeds 0-2 -> benchmarks/results/retina_ordinal.json
    python benchmarks/retina_ordinal.py --seeds 0 --heads ce regression
    python benchmarks/retina_ordinal.py --table           # the README table from the saved results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import RESULTS, mean_sd, save_result  # noqa: E402
from default_run import measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "retinamnist.npz"
RUNS = Path(__file__).parent / "runs" / "retina_ordinal"
HEADS = ("ce", "smooth", "corn", "regression")
ENSEMBLE = "ensemble"  # the soft ensemble of the seed's heads (averaged per-grade probabilities)
PUBLISHED = {"ResNet-18 (28)": (0.717, 0.524), "Google AutoML Vision": (0.750, 0.531)}  # AUC, ACC (MedMNIST v2)
TARGET_GAIN, TARGET_ACC, TARGET_AUC, MAX_SECONDS = 0.05, 0.531, 0.750, 300


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def ordinal_row(run: Path) -> dict:
    """The ordinal numbers of a finished run (or ensemble) folder's metrics.json."""
    m = json.loads((run / "metrics.json").read_text())
    t, refer = m["test"], m["test"]["refer"]
    return {"test_qwk": _r(t["qwk"]), "test_qwk_ci95": [_r(v) for v in t["ci95"]["qwk"]],
            "test_linear_kappa": _r(t["linear_kappa"]), "test_within_one": _r(t["within_one"]),
            "test_mae": _r(t["mae"]), "test_acc": _r(t["accuracy"]), "test_auc": _r(t["auc"]),
            "val_qwk": _r(m["val"]["qwk"]), "refer_threshold": _r(refer.get("threshold")),
            "refer_sensitivity": _r(refer.get("sensitivity")),
            "refer_sensitivity_ci95": [_r(v) for v in refer["ci95"]["sensitivity"]],
            "refer_specificity": _r(refer.get("specificity")),
            "refer_specificity_ci95": [_r(v) for v in refer["ci95"]["specificity"]],
            "refer_auc": _r(refer.get("auc")), "cutpoints": t.get("cutpoints")}


def run_head(head: str, seed: int) -> dict:
    extra = ["--data", str(DATA), "--set", "data.task=ordinal", "--set", f"train.ordinal={head}",
             "--set", "train.monitor=qwk", "--set", f"train.seed={seed}"]
    folder = RUNS / f"{head}-seed{seed}"
    row = measure(extra, keep=folder, reuse=True)
    row.update(ordinal_row(folder), head=head, seed=seed)
    plan = json.loads((folder / "plan.json").read_text())
    row["plan"] = {d["key"]: d["value"] for d in plan["decisions"]}
    return row


def run_ensemble(seed: int, heads: list[str]) -> dict:
    from medsight.evaluation.ensemble import ensemble

    folder = RUNS / f"{ENSEMBLE}-seed{seed}"
    if not (folder / "metrics.json").is_file():
        ensemble([RUNS / f"{h}-seed{seed}" for h in heads], "soft", folder, seed=seed)
    return {**ordinal_row(folder), "head": ENSEMBLE, "seed": seed, "members": heads, "seconds": 0.0}


def summarize(rows: list[dict]) -> dict:
    """Mean and sd per head over the seeds every head finished, and the targets judged on those means."""
    names = [h for h in (*HEADS, ENSEMBLE) if any(r["head"] == h for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    complete = [s for s in seeds if {r["head"] for r in rows if r["seed"] == s} >= {"ce", *[h for h in HEADS if h in names]}]
    done = [r for r in rows if r["seed"] in complete]
    keys = ("test_qwk", "test_acc", "test_auc", "test_within_one", "test_mae", "refer_sensitivity",
            "refer_specificity", "refer_auc", "val_qwk", "seconds")
    means = {h: {k: mean_sd([r[k] for r in done if r["head"] == h and r.get(k) is not None])
                 for k in keys if any(r["head"] == h and r.get(k) is not None for r in done)}
             for h in names if any(r["head"] == h for r in done)}
    out: dict = {"seeds_complete": complete, "means": means, "runs": rows}
    ordinal = [h for h in HEADS if h != "ce" and h in means]
    if "ce" in means and ordinal and len(complete) >= 3:
        best = max(ordinal, key=lambda h: means[h]["test_qwk"]["mean"])
        b, ce = means[best], means["ce"]
        out["best_ordinal"] = best
        out["targets_met"] = {
            "qwk_gain_0.05": b["test_qwk"]["mean"] >= ce["test_qwk"]["mean"] + TARGET_GAIN,
            "acc_0.531": b["test_acc"]["mean"] >= TARGET_ACC, "auc_0.750": b["test_auc"]["mean"] >= TARGET_AUC,
            "time_300s": max(r["seconds"] for r in done if r["head"] != ENSEMBLE) <= MAX_SECONDS}
    return out


def table(results: dict) -> str:
    lines = ["| head (train.ordinal) | test QWK | test ACC | test AUC | within one grade | MAE | "
             "refer ≥ 2: sensitivity | specificity | refer AUC | time per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    means = results["means"]

    def ms(h: str, k: str) -> str:
        v = means[h].get(k)
        return "–" if v is None else f"{v['mean']:.3f} ± {v['sd']:.3f}"

    for h, m in means.items():
        mark = "**" if h == results.get("best_ordinal") else ""
        secs = "–" if h == ENSEMBLE else f"{m['seconds']['mean']:.0f} s"
        lines.append(f"| {mark}{h}{mark} | {ms(h, 'test_qwk')} | {ms(h, 'test_acc')} | {ms(h, 'test_auc')} | "
                     f"{ms(h, 'test_within_one')} | {ms(h, 'test_mae')} | {ms(h, 'refer_sensitivity')} | "
                     f"{ms(h, 'refer_specificity')} | {ms(h, 'refer_auc')} | {secs} |")
    for name, (auc, acc) in PUBLISHED.items():
        lines.append(f"| {name}, MedMNIST v2 (published) | – | {acc:.3f} | {auc:.3f} | – | – | – | – | – | – |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    ap.add_argument("--table", action="store_true", help="print the README table of the saved results")
    args = ap.parse_args()
    path = RESULTS / "retina_ordinal.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return 0
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    rows = [r for r in old if (r["head"], r["seed"]) not in {(h, s) for h in (*args.heads, ENSEMBLE) for s in args.seeds}]
    for seed in args.seeds:
        for head in args.heads:
            row = run_head(head, seed)
            rows.append(row)
            print(f"{head} seed {seed}: QWK {row['test_qwk']:.4f} ACC {row['test_acc']:.4f} AUC {row['test_auc']:.4f} "
                  f"refer sens {row['refer_sensitivity']} spec {row['refer_specificity']} {row['seconds']:.0f}s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            save_result("retina_ordinal.json", summarize(rows), echo=False)
        if len(args.heads) > 1:
            rows.append(run_ensemble(seed, args.heads))
            save_result("retina_ordinal.json", summarize(rows), echo=False)
    results = summarize(rows)
    results["machine"] = next(r["machine"] for r in rows if "machine" in r)
    save_result("retina_ordinal.json", results, echo=False)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
