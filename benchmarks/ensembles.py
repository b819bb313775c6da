"""Compare and ensemble small backbones on the embedded default, at CPU scale.

Members: the coatnet_tiny runs of benchmarks/optimizers.py (AdamW and SAM-AdamW) and a ResNet-18 trained
with `medsight train --model resnet18 --optimizer adamw --lr 1e-3`; then `medsight compare` and
`medsight ensemble --method soft|weighted|stacking` on them.

    python benchmarks/optimizers.py && python benchmarks/ensembles.py   # writes results/ensembles.json
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from default_run import measure  # noqa: E402

RUNS = Path(__file__).parent / "runs"


def main() -> int:
    members = [RUNS / "adamw", RUNS / "sam-adamw"]
    missing = [m for m in members if not (m / "predictions.npz").is_file()]
    if missing:
        print(f"run benchmarks/optimizers.py first (missing {', '.join(map(str, missing))})", file=sys.stderr)
        return 2
    resnet = RUNS / "resnet18-adamw"
    if resnet.exists():
        shutil.rmtree(resnet)
    row = measure(["--model", "resnet18", "--optimizer", "adamw", "--lr", "1e-3"], keep=resnet)
    members.append(resnet)
    subprocess.run([sys.executable, "-m", "medsight", "compare", *map(str, members), "--out",
                    str(RUNS / "compare")], check=True)
    rows = json.loads((RUNS / "compare" / "compare.json").read_text())["runs"]
    table = [{"name": r["run"], "model": r["model"], "test_auc": round(r["auc"], 4),
              "test_acc": round(r["accuracy"], 4), "images_per_s": r["images_per_s"]} for r in rows]
    for method in ("soft", "weighted", "stacking"):
        out = RUNS / f"ensemble-{method}"
        subprocess.run([sys.executable, "-m", "medsight", "ensemble", *map(str, members), "--method", method,
                        "--out", str(out)], check=True)
        t = json.loads((out / "metrics.json").read_text())["test"]
        table.append({"name": f"ensemble ({method})", "model": "3 members", "test_auc": round(t["auc"], 4),
                      "test_acc": round(t["accuracy"], 4), "images_per_s": None})
    result = {"rows": table, "diversity": json.loads((RUNS / "compare" / "compare.json").read_text())["diversity"],
              "resnet18_seconds": row["seconds"], "machine": row["machine"]}
    out = Path(__file__).parent / "results" / "ensembles.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
