"""CoAtNet + SAM against the published MedMNIST v2 PneumoniaMNIST rows, baseline rerun in the same harness.

Every configuration trains and evaluates through medsight's own `train`, on the embedded PneumoniaMNIST
(28 px images resized to the model input), 3 seeds each; the best epoch is chosen on validation AUC,
never on test.

    python benchmarks/pneumoniamnist.py                    # all configs x 3 seeds (a GPU: bf16, channels_last)
    python benchmarks/pneumoniamnist.py --configs coatnet0_sam --seeds 0   # one cell
    python benchmarks/pneumoniamnist.py --quick            # CPU smoke run: 1 epoch on a small subset
    python benchmarks/pneumoniamnist.py --table            # the README table from the results file

Rows go to benchmarks/results/pneumoniamnist.json (or pneumoniamnist_quick.json):
{"config", "seed", "test_auc", "test_acc", "test_acc_at_val_threshold", "val_auc", "epochs", "seconds",
 "device", "sharpness", "status"}; a diverged run (NaN loss) is kept with status "diverged".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from medsight.config import DEFAULT_DATA, load_config
from medsight.engine import TrainingError, train

RESULTS = Path(__file__).parent / "results"

#: name -> overrides. The ResNet-18 row follows the paper's protocol (from scratch, Adam 1e-3, x0.1 at
#: 50% and 75% of 100 epochs, batch 128, best epoch by validation AUC); the CoAtNets share one schedule.
CONFIGS: dict[str, list[str]] = {
    "resnet18_paper": ["model.name=resnet18", "optim.name=adam", "optim.lr=1e-3", "optim.weight_decay=0",
                       "schedule.name=multistep", "schedule.milestones=[50, 75]", "train.epochs=100",
                       "train.batch_size=128", "data.image_size=224", "train.class_weights=false"],
    "coatnet0_adamw": ["model.name=coatnet_0", "optim.name=adamw", "optim.lr=1e-3", "train.epochs=30",
                       "train.batch_size=128", "data.image_size=224", "schedule.warmup_epochs=2"],
    "coatnet0_sam": ["model.name=coatnet_0", "optim.name=sam-adamw", "optim.lr=1e-3", "train.epochs=30",
                     "train.batch_size=128", "data.image_size=224", "schedule.warmup_epochs=2"],
    "coatnet_tiny_sam": ["model.name=coatnet_tiny", "optim.name=sam-adamw", "optim.lr=2e-3", "train.epochs=30",
                         "train.batch_size=128", "data.image_size=64", "schedule.warmup_epochs=2"],
}

PUBLISHED = [("ResNet-18 (28)", 0.944, 0.854), ("ResNet-18 (224)", 0.956, 0.864), ("ResNet-50 (224)", 0.962, 0.884),
             ("AutoKeras", 0.947, 0.878), ("Google AutoML Vision", 0.991, 0.946)]
REQUIRED = ("config", "seed", "test_auc", "test_acc", "val_auc", "epochs", "seconds", "device", "status")


def quick_data(tmp: Path, n_train: int = 160, n_eval: int = 48) -> Path:
    """A stratified-enough subset of the embedded set for the CPU smoke run."""
    with np.load(DEFAULT_DATA) as z:
        arrays = {}
        for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
            arrays[f"{split}_images"] = z[f"{split}_images"][:n]
            arrays[f"{split}_labels"] = z[f"{split}_labels"][:n]
    path = tmp / "pneumoniamnist_quick.npz"
    np.savez(path, **arrays)
    return path


def run_one(name: str, seed: int, out: Path, quick: bool, data: Path | None) -> dict:
    sets = CONFIGS[name] + [f"train.seed={seed}", f"data.split_seed={seed}", f"out={out}", "explain.gallery_per_class=2"]
    if torch.cuda.is_available():
        workers = max(4, min(12, (os.cpu_count() or 1) - 2))  # 28 px images upscaled in the workers
        sets += ["train.precision=bf16", f"data.num_workers={workers}"]
    if quick:
        sets += ["train.epochs=1", "data.image_size=32", "train.batch_size=32", "schedule.warmup_epochs=0",
                 "schedule.milestones=[1]", "train.sharpness_batches=1", "explain.faithfulness_images=0",
                 f"data.path={data}"]
    cfg = load_config(None, sets)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    try:
        result = train(cfg, progress=False)
    except TrainingError as exc:
        if "diverged" not in str(exc):
            raise
        return {"config": name, "seed": seed, "test_auc": None, "test_acc": None, "test_acc_at_val_threshold": None,
                "val_auc": None, "epochs": None, "seconds": None, "device": device, "sharpness": None,
                "status": "diverged", "error": str(exc)}
    m = result.metrics
    return {"config": name, "seed": seed, "test_auc": m["test"]["auc"], "test_acc": m["test"]["accuracy"],
            "test_acc_at_val_threshold": m["test"].get("accuracy_at_threshold"), "val_auc": m["val"]["auc"],
            "epochs": m["epochs_run"], "best_epoch": m["best_epoch"], "seconds": m["train_seconds"], "device": device,
            "sharpness": (m.get("sharpness") or {}).get("ascent"), "status": "ok"}


def check_rows(rows: list[dict]) -> None:
    """Refuse rows that cannot be tabulated honestly (missing seed or config, or missing fields)."""
    for i, r in enumerate(rows):
        missing = [k for k in REQUIRED if k not in r or (k in ("config", "seed") and r[k] is None)]
        if missing:
            raise ValueError(f"results row {i} lacks {', '.join(missing)}: {r}")
        if r["config"] not in CONFIGS:
            raise ValueError(f"results row {i} has an unknown config {r['config']!r}")
        if r["status"] == "ok" and any(r[k] is None or not math.isfinite(r[k]) for k in ("test_auc", "test_acc")):
            raise ValueError(f"results row {i} is marked ok but has no finite test metrics: {r}")


def table(rows: list[dict]) -> str:
    """Markdown: mean ± sd per config (diverged runs counted and named), beside the published rows."""
    check_rows(rows)
    lines = ["| configuration | seeds | test AUC | test ACC | ACC at val threshold | sharpness |", "|---|---|---|---|---|---|"]

    def ms(values: list[float]) -> str:
        if not values:
            return "–"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        ok = [r for r in mine if r["status"] == "ok"]
        div = len(mine) - len(ok)
        seeds = f"{len(ok)}" + (f" (+{div} diverged)" if div else "")
        lines.append(f"| {name} | {seeds} | {ms([r['test_auc'] for r in ok])} | {ms([r['test_acc'] for r in ok])} | "
                     f"{ms([r['test_acc_at_val_threshold'] for r in ok if r.get('test_acc_at_val_threshold') is not None])} | "
                     f"{ms([r['sharpness'] for r in ok if r.get('sharpness') is not None])} |")
    for label, auc, acc in PUBLISHED:
        lines.append(f"| {label} (published) | | {auc:.3f} | {acc:.3f} | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 1 epoch, 32 px, a small subset, 1 seed")
    p.add_argument("--table", action="store_true", help="print the README table from the results file")
    p.add_argument("--out", help="results file (default benchmarks/results/pneumoniamnist[_quick].json)")
    args = p.parse_args()
    out = Path(args.out) if args.out else RESULTS / ("pneumoniamnist_quick.json" if args.quick else "pneumoniamnist.json")
    rows = json.loads(out.read_text()) if out.exists() else []
    if args.table:
        print(table(rows))
        return 0
    seeds = args.seeds[:1] if args.quick else args.seeds
    with tempfile.TemporaryDirectory() as tmp:
        data = quick_data(Path(tmp)) if args.quick else None
        for name in args.configs:
            for seed in seeds:
                row = run_one(name, seed, Path(tmp) / f"{name}-{seed}", args.quick, data)
                rows = [r for r in rows if (r["config"], r["seed"]) != (name, seed)] + [row]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=2) + "\n")  # after every run: a stopped sweep keeps its rows
                print(f"{name} seed {seed}: {row['status']} test AUC {row['test_auc']} ACC {row['test_acc']}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
