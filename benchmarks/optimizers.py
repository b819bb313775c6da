"""AdamW vs SAM vs LookSAM on the embedded default: test AUC/ACC and sharpness side by side.

Each row is `medsight train --optimizer NAME` with every other option at its default (coatnet_tiny,
64 px, 4 epochs, batch 64, lr 2e-3, cosine), so any row can be rerun by hand. The run folders are kept
in benchmarks/runs/ for benchmarks/ensembles.py.

    python benchmarks/optimizers.py                  # writes benchmarks/results/optimizers.json
    python benchmarks/optimizers.py looksam-adamw    # rerun one row
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import save_result  # noqa: E402
from default_run import measure  # noqa: E402

NAMES = ("adamw", "sam-adamw", "looksam-adamw")


def main() -> int:
    keep = Path(__file__).parent / "runs"  # kept for benchmarks/ensembles.py
    keep.mkdir(exist_ok=True)
    out = Path(__file__).parent / "results" / "optimizers.json"
    only = sys.argv[1:]  # rerun just these optimizers, keeping the other rows
    previous = {r["command"].split()[-1]: r for r in json.loads(out.read_text())["rows"]} if only and out.exists() else {}
    rows = []
    for name in NAMES:
        if only and name not in only and name in previous:
            rows.append(previous[name])
            continue
        if (keep / name).exists():
            import shutil

            shutil.rmtree(keep / name)
        rows.append(measure(["--optimizer", name], keep=keep / name))
    by = {n: r for n, r in zip(NAMES, rows)}
    gain_sam = by["sam-adamw"]["test_acc"] - by["adamw"]["test_acc"]
    gain_look = by["looksam-adamw"]["test_acc"] - by["adamw"]["test_acc"]
    summary = {"rows": rows, "sam_acc_gain": round(gain_sam, 4), "looksam_acc_gain": round(gain_look, 4),
               "looksam_keeps_90pct_of_sam_gain": bool(gain_sam > 0 and gain_look >= 0.9 * gain_sam)}
    save_result(out.name, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
