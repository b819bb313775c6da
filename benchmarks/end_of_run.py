"""What share of the default run the end-of-run work takes: `medsight train` (no arguments), with each
end-of-run step's seconds (evaluation, trust, Grad-CAM gallery, faithfulness, sharpness, robustness, report)
from the run's timing.json, against training and validation.

Target (issue "The main job on one GPU"): the end-of-run work at most 25% of the run (training +
validation + end of run).

    python benchmarks/end_of_run.py --label after     # writes benchmarks/results/end_of_run.json["after"]
    python benchmarks/end_of_run.py --label before --set eval.robustness=true

Each label's row is kept in the file beside the others (a before/after pair is two runs of this script, one on
each version of the code).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _results import RESULTS, save_result
from default_run import measure

TARGET_SHARE = 0.25


def end_of_run_row(extra: list[str]) -> dict:
    """Run `medsight train [extra]` once; its time split and test metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(tmp) / "run"
        row = measure(extra, keep=keep)
        timing = json.loads((keep / "timing.json").read_text())
    steps = timing["end_of_run_steps"]
    total = timing["train_seconds"] + timing["validation_seconds"] + timing["end_of_run_seconds"]
    return {**row, "timing": timing,
            "step_share": {k: round(v / total, 4) for k, v in steps.items()},
            "target_met": timing["end_of_run_share"] <= TARGET_SHARE}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after", help="the row's name in end_of_run.json (e.g. before, after)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the run (repeatable)")
    p.add_argument("--output", default="end_of_run.json")
    args = p.parse_args()
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    row = end_of_run_row(extra)
    path = RESULTS / args.output
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[args.label] = row
    save_result(args.output, doc, echo=False)
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
