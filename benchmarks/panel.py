"""The panel: the plain default (`medsight train --data X`, nothing else but the seed) on every data set
of the panel, 3 seeds each, beside the published MedMNIST v2 rows.

Targets (issue "Defaults that fit the data a user brings"), mean of 3 seeds on a 2-core CPU, each run
at most 5 minutes: PneumoniaMNIST AUC >= 0.955 and ACC >= 0.88; RetinaMNIST AUC >= 0.750 and
ACC >= 0.531 (Google AutoML Vision's published 28-px figures); every row above ResNet-18 (28) on both.

    python benchmarks/panel.py                 # all data sets, seeds 0-2 (resumes from kept runs)
    python benchmarks/panel.py --seeds 0 --sets retinamnist
    python benchmarks/panel.py --table         # the README table from benchmarks/results/panel.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _results import RESULTS, mean_sd, save_result
from default_run import measure

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path(__file__).parent / "runs" / "panel"

#: name -> (data file, published ResNet-18 (28) AUC/ACC, Google AutoML Vision AUC/ACC, target AUC/ACC)
PANEL = {
    "pneumoniamnist": (ROOT / "data" / "pneumoniamnist.npz", (0.944, 0.854), (0.991, 0.946), (0.955, 0.88)),
    "retinamnist": (ROOT / "data" / "retinamnist.npz", (0.717, 0.524), (0.750, 0.531), (0.750, 0.531)),
}
MAX_SECONDS = 300


def run_set(name: str, seeds: list[int]) -> dict:
    data, resnet, automl, target = PANEL[name]
    rows = []
    for seed in seeds:
        extra = ["--data", str(data), "--set", f"train.seed={seed}"]
        row = measure(extra, keep=RUNS / f"{name}-seed{seed}", reuse=True)
        row["seed"] = seed
        plan = json.loads((RUNS / f"{name}-seed{seed}" / "plan.json").read_text())
        row["plan"] = {d["key"]: d["value"] for d in plan["decisions"]}
        rows.append(row)
        print(f"{name} seed {seed}: AUC {row['test_auc']:.4f} ACC {row['test_acc']:.4f} {row['seconds']:.0f}s",
              flush=True)
    auc, acc = mean_sd([r["test_auc"] for r in rows]), mean_sd([r["test_acc"] for r in rows])
    secs = [r["seconds"] for r in rows]
    return {"data": str(data.relative_to(ROOT)), "runs": rows, "test_auc": auc, "test_acc": acc,
            "seconds": {"median": sorted(secs)[len(secs) // 2], "max": max(secs)},
            "published": {"resnet18_28": resnet, "automl_vision": automl}, "target": target,
            "targets_met": {"auc": auc["mean"] >= target[0], "acc": acc["mean"] >= target[1],
                            "beats_resnet18": auc["mean"] > resnet[0] and acc["mean"] > resnet[1],
                            "time": max(secs) <= MAX_SECONDS} if len(rows) >= 3 else None}


def table(results: dict) -> str:
    lines = ["| data set | medsight default: test AUC | test ACC | time per run (median, max) | plan | "
             "ResNet-18 (28) | AutoML Vision | targets |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["sets"].items():
        p = r["runs"][0]["plan"]
        plan = f"{p.get('model.name')}, {p.get('data.image_size')} px, {p.get('train.epochs')} epochs"
        met = r["targets_met"]
        lines.append(f"| {name} ({len(r['runs'])} seeds) | {r['test_auc']['mean']:.3f} ± {r['test_auc']['sd']:.3f} | "
                     f"{r['test_acc']['mean']:.3f} ± {r['test_acc']['sd']:.3f} | {r['seconds']['median']:.0f} s, "
                     f"{r['seconds']['max']:.0f} s | {plan} | {r['published']['resnet18_28'][0]:.3f} / "
                     f"{r['published']['resnet18_28'][1]:.3f} | {r['published']['automl_vision'][0]:.3f} / "
                     f"{r['published']['automl_vision'][1]:.3f} | "
                     + ("n/a (fewer than 3 seeds)" if met is None else ", ".join(f"{k} {'met' if v else 'NOT met'}"
                                                                                 for k, v in met.items())) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sets", nargs="+", default=list(PANEL), choices=list(PANEL))
    ap.add_argument("--table", action="store_true", help="print the README table of the saved results")
    args = ap.parse_args()
    path = RESULTS / "panel.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return 0
    results = json.loads(path.read_text()) if path.is_file() else {"sets": {}}
    for name in args.sets:
        results["sets"][name] = run_set(name, args.seeds)
        save_result("panel.json", results, echo=False)
    results["machine"] = results["sets"][args.sets[0]]["runs"][0]["machine"]
    save_result("panel.json", results, echo=False)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
