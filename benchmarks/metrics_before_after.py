"""Metrics of every task kind before and after a change, on the same fixed predictions: a refactoring of the
statistics must leave them unchanged.

    git archive <old commit> | tar -x -C /tmp/before
    python benchmarks/metrics_before_after.py --before /tmp/before

Runs ``metrics_cases.py`` under each source tree (PYTHONPATH), each writing every case's decision, metrics
(1,000 bootstrap resamples), console summary, report tables and checklist, then the operating points and the
subgroup audit; compares the two dumps value by value. Results: benchmarks/results/metrics_before_after.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _results import save_result

HERE = Path(__file__).resolve().parent


def dump(tree: Path, out: Path, predictions: Path | None) -> Any:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(HERE / "metrics_cases.py"), str(out)] + ([str(predictions)] if predictions else [])
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def compare(a: Any, b: Any, path: str, found: list[dict[str, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append({"where": f"{path}/{k}", "only_in": "before" if k in a else "after"})
            else:
                compare(a[k], b[k], f"{path}/{k}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{path}[{i}]", found)
    elif isinstance(a, float) and isinstance(b, float):
        if a != b:
            found.append({"where": path, "before": a, "after": b, "abs_diff": abs(a - b)})
    elif a != b:
        found.append({"where": path, "before": a, "after": b})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, type=Path, help="source tree of the earlier version")
    p.add_argument("--after", type=Path, default=HERE.parent)
    p.add_argument("--predictions", type=Path, help="a run's predictions.npz for the binary case (default: simulated)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = dump(args.before, Path(tmp) / "before.json", args.predictions)
        after = dump(args.after, Path(tmp) / "after.json", args.predictions)
    found: list[dict[str, Any]] = []
    compare(before, after, "", found)
    floats = [d["abs_diff"] for d in found if "abs_diff" in d]
    save_result("metrics_before_after.json", {
        "command": "python benchmarks/metrics_before_after.py --before BEFORE_TREE",
        "cases": sorted(before), "values_compared": "every metric, summary line, report table and checklist",
        "differences": len(found), "non_float_differences": [d for d in found if "abs_diff" not in d],
        "largest_float_difference": max(floats, default=0.0),
        "float_differences": found if len(found) <= 40 else found[:40]})


if __name__ == "__main__":
    main()
