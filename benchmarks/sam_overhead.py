"""SAM's cost, measured: images/s of the plain optimizer, two-pass SAM and LookSAM on one model and batch.

Step-only throughput on random data (forward + backward + update, no loader), then medsight's own
training loop with its data loader on the embedded PneumoniaMNIST for comparison.

Targets (issue "SAM at full speed and at scale"): SAM <= 2.05x the plain step's time; LookSAM <= 1.35x at
its default k; the training loop, data included, within 10% of the step-only figure.

    python benchmarks/sam_overhead.py                                   # CPU: coatnet_tiny, 64 px, batch 64
    python benchmarks/sam_overhead.py --model coatnet_0_rw_224 --image-size 224 --batch 128 \\
        --precision bf16 --steps 30 [--compile]                          # a GPU: the reference setting
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch
from torch import nn

from _results import save_result
from medsight.config import OptimConfig, load_config
from medsight.models import create_model, prepare_compile
from medsight.optim import create_optimizer
from medsight.engine import StepOptions, train, train_step

OPTIMIZERS = ("adamw", "sam-adamw", "looksam-adamw")


def step_throughput(args: argparse.Namespace, name: str, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=2, img_size=args.image_size).to(device)
    if args.compile:
        prepare_compile(model)
    model = model.to(memory_format=torch.channels_last).train()
    opt = create_optimizer(model, OptimConfig(name=name, lr=1e-4), fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch,), device=device)
    opts = StepOptions(precision=args.precision)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(args.warmup):
        train_step(step_model, x, y, opt, loss_fn, opts=opts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(step_model, x, y, opt, loss_fn, opts=opts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - t0)


def loop_throughput(args: argparse.Namespace, name: str) -> float:
    """medsight's training loop on the embedded data, one epoch: training images / training seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"model.name={args.model}", f"optim.name={name}", "train.epochs=1",
                                 f"train.batch_size={args.batch}", f"data.image_size={args.image_size}",
                                 f"train.precision={args.precision}", f"out={tmp}/run",
                                 "train.sharpness_batches=0", "explain.gallery_per_class=0",
                                 f"train.compile={'true' if args.compile else 'false'}"])
        result = train(cfg, progress=False)
        row = result.history[0]
        return row["train_images"] / row["train_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-loop", action="store_true", help="skip the training-loop measurement")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step = {n: step_throughput(args, n, device) for n in OPTIMIZERS}
    base = step["adamw"]
    row = {
        "model": args.model, "image_size": args.image_size, "batch": args.batch, "precision": args.precision,
        "compile": args.compile, "steps": args.steps,
        "images_per_s": {n: round(v, 1) for n, v in step.items()},
        "time_ratio_vs_adamw": {n: round(base / v, 3) for n, v in step.items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    if not args.no_loop:
        loop = {n: loop_throughput(args, n) for n in OPTIMIZERS}
        row["loop_images_per_s"] = {n: round(v, 1) for n, v in loop.items()}
        row["loop_vs_step"] = {n: round(loop[n] / step[n], 3) for n in OPTIMIZERS}
    ratios = row["time_ratio_vs_adamw"]
    row["targets_met"] = {"sam_le_2.05x": ratios["sam-adamw"] <= 2.05, "looksam_le_1.35x": ratios["looksam-adamw"] <= 1.35}
    if "loop_vs_step" in row:
        row["targets_met"]["loop_within_10pct"] = all(v >= 0.9 for v in row["loop_vs_step"].values())
    save_result(f"sam_overhead_{'gpu' if device.type == 'cuda' else 'cpu'}.json", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
