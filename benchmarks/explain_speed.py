"""Grad-CAM throughput and memory: `medsight.explainers.explain` on N images in batches.

Reference on one H100 (issue "Explanations clinicians and auditors can trust"): coatnet_0 at 224 px,
batch 64 — the grad-cam library 679 img/s, a minimal hook implementation 720 img/s; target >= 650 img/s,
memory flat over 2,000 images (no hook leaks).

    python benchmarks/explain_speed.py                                   # CPU: coatnet_tiny, 64 px
    python benchmarks/explain_speed.py --model coatnet_0 --image-size 224 --batch 64 --images 2000  # a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import torch

from _results import save_result
from medsight.explainers import explain
from medsight.models import create_model


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as fh:  # resident set size
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def device_name(device: torch.device) -> str:
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads")


def gradcam_speed(model_name: str, image_size: int, batch: int, images: int, method: str,
                  device: torch.device) -> dict:
    """Images/s of ``explain`` on ``images`` random images in batches of ``batch``, memory along the way and
    the hooks left on the model after it."""
    model = create_model(model_name, num_classes=2, img_size=image_size).to(device).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    explain(model, x, method=method)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    mem = [memory_mb(device)]
    done, t0 = 0, time.perf_counter()
    while done < images:
        maps = explain(model, x, method=method)
        done += len(maps)
        mem.append(memory_mb(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(getattr(m, "_forward_pre_hooks", {}))
                for m in model.modules())
    return {"model": model_name, "image_size": image_size, "batch": batch, "images": done,
            "method": method, "images_per_s": round(done / seconds, 1),
            "memory_mb_first_last_max": [round(mem[0], 1), round(mem[-1], 1), round(max(mem), 1)],
            "hooks_left": hooks, "device": device_name(device)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--method", default="gradcam")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = gradcam_speed(args.model, args.image_size, args.batch, args.images, args.method, device)
    save_result(f"explain_speed_{'gpu' if device.type == 'cuda' else 'cpu'}.json", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
