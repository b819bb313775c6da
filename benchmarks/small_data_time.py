"""The small-data row's run time: the plan as it is now (AdamW, TTA decisions) against the plan before its
small-data rule (SAM, no TTA), whole `medsight train` runs alternated A B A B ..., median and range.

Target (issue "technique evidence table", small data): the plain default on 500 PneumoniaMNIST training images
reaches AUC 0.944 / ACC 0.854 in at most 5 minutes a run on a 2-core CPU.

    python benchmarks/small_data_time.py --rounds 5    # -> benchmarks/results/small_data_time.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import positive_int, save_result  # noqa: E402
from default_run import measure  # noqa: E402
from techniques import PANEL, PINNED, _relative, train_args  # noqa: E402

TARGET_SECONDS = 300
VARIANTS = {"recipe (the plan now)": (), "former default (SAM, no TTA)": PINNED}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data, panel = PANEL["pneumonia500"]
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, pins in VARIANTS.items():  # alternated, so a slow spell of the machine hits both
            sets = [*panel, *pins, f"train.seed={args.seed}"]
            row = _relative(measure(train_args(data, sets)))
            rows[name].append(row)
            print(f"round {r + 1}/{args.rounds} {name}: {row['seconds']:.1f} s, AUC {row['test_auc']} "
                  f"ACC {row['test_acc']}", flush=True)
    summary = {}
    for name, rs in rows.items():
        s = [r["seconds"] for r in rs]
        summary[name] = {"median_seconds": round(statistics.median(s), 1), "min_seconds": min(s),
                         "max_seconds": max(s), "test_auc": rs[0]["test_auc"], "test_acc": rs[0]["test_acc"],
                         "command": rs[0]["command"], "within_target": max(s) <= TARGET_SECONDS}
    a, b = (summary[n]["median_seconds"] for n in VARIANTS)
    machine = next(iter(rows.values()))[0]["machine"]
    save_result("small_data_time.json", {"rounds": args.rounds, "seed": args.seed, "machine": machine,
                                         "runs": summary, "former_over_recipe": round(b / a, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
