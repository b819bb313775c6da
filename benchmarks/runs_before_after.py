"""Every command's output before and after a change, on full runs: a refactoring must leave them unchanged.

Three short runs (the embedded default, a multi-label run on the NIH 1,000-image set, an ordinal run on
RetinaMNIST; one epoch each, seed 0, so that they take minutes), each followed by ``evaluate`` on its own data,
``predict --json`` on six test images, and for the default run ``export`` and ``predict --onnx``. The same
commands run under each source tree (PYTHONPATH); metrics.json (train and evaluate), predictions.npz and the
predictions are compared value by value, leaving out what a run measures about itself (times, paths,
versions). Results: benchmarks/results/runs_before_after.json.

    git worktree add /tmp/before <old commit>
    python benchmarks/runs_before_after.py --tree /tmp/before --out /tmp/ba/before
    python benchmarks/runs_before_after.py --tree . --out /tmp/ba/after
    python benchmarks/runs_before_after.py --compare /tmp/ba/before /tmp/ba/after
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _results import save_result

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "default": (None, ["--set", "train.epochs=1"]),
    "multilabel": (ROOT / "data" / "nih_cxr14_1000.npz", ["--set", "train.epochs=1"]),
    "ordinal": (ROOT / "data" / "retinamnist.npz", ["--set", "data.task=ordinal", "--set", "train.epochs=1"]),
}
#: what a run measures about itself, not what it computes
VOLATILE = re.compile(r"time|second|date|path|folder|version|created|host|machine|duration|throughput|per_s|torch|"
                      r"python|platform|command|cwd|out$|run$|checkpoint|^file$|^data$", re.I)


def test_images(npz: Path | None, folder: Path, n: int = 6) -> list[str]:
    import cv2

    data = np.load(npz if npz else ROOT / "data" / "pneumoniamnist.npz")
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(data["test_images"][:n]):
        names.append(str(folder / f"{i}.png"))
        cv2.imwrite(names[-1], img if img.ndim == 2 else img[..., ::-1])
    return names


def medsight(tree: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "medsight", *args], env=env, check=True, capture_output=True,
                          text=True, cwd=tree)
    return done.stdout


def produce(tree: Path, out: Path) -> None:
    for name, (data, sets) in RUNS.items():
        run = out / name
        if not (run / "metrics.json").is_file():
            medsight(tree, "train", "--no-progress", *(["--data", str(data)] if data else []), *sets,
                     "--set", "train.seed=0", "--set", "train.threads=1", "--out", str(run))
        src = data if data else ROOT / "data" / "pneumoniamnist.npz"
        medsight(tree, "evaluate", str(run / "best.pt"), "--data", str(src), "--out", str(out / f"{name}-evaluate"))
        images = test_images(data, out / f"{name}-images")
        (out / f"{name}-predict.jsonl").write_text(medsight(tree, "predict", "--json", str(run / "best.pt"), *images))
        if name == "default":
            medsight(tree, "export", str(run / "best.pt"), "--out", str(out / "default.onnx"))
            (out / "default-onnx.jsonl").write_text(
                medsight(tree, "predict", "--json", "--onnx", str(out / "default.onnx"), *images))


def compare(a: Any, b: Any, where: str, found: list[dict[str, Any]], tol: float = 1e-6) -> int:
    """Values compared; every difference appended to ``found``."""
    if isinstance(a, dict) and isinstance(b, dict):
        n = 0
        for k in sorted(set(a) | set(b)):
            if VOLATILE.search(str(k)):
                continue
            if k not in a or k not in b:
                found.append({"where": f"{where}/{k}", "only_in": "before" if k in a else "after"})
            else:
                n += compare(a[k], b[k], f"{where}/{k}", found, tol)
        return n
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return sum(compare(x, y, f"{where}[{i}]", found, tol) for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not np.isclose(a, b, rtol=tol, atol=tol, equal_nan=True):
            found.append({"where": where, "before": a, "after": b})
        return 1
    if a != b:
        found.append({"where": where, "before": a, "after": b})
    return 1


def compare_trees(before: Path, after: Path) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    counted: dict[str, int] = {}
    for name in RUNS:
        for part in (f"{name}/metrics.json", f"{name}-evaluate/metrics.json"):
            counted[part] = compare(json.loads((before / part).read_text()), json.loads((after / part).read_text()),
                                    part, found)
        pa, pb = np.load(before / name / "predictions.npz"), np.load(after / name / "predictions.npz")
        counted[f"{name}/predictions.npz"] = compare({k: pa[k].tolist() for k in pa.files},
                                                     {k: pb[k].tolist() for k in pb.files}, f"{name}/predictions", found)
        for part in [f"{name}-predict.jsonl"] + (["default-onnx.jsonl"] if name == "default" else []):
            rows = [[json.loads(line) for line in (t / part).read_text().splitlines()] for t in (before, after)]
            counted[part] = compare(rows[0], rows[1], part, found)
    return {"values_compared": counted, "differences": found, "unchanged": not found}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, help="source tree to run (PYTHONPATH)")
    ap.add_argument("--out", type=Path, help="where its runs go")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        result = compare_trees(*args.compare)
        save_result("runs_before_after.json", result, echo=False)
        print(json.dumps({"values_compared": result["values_compared"], "differences": result["differences"][:20]},
                         indent=1))
        return 0 if result["unchanged"] else 1
    produce(args.tree, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
