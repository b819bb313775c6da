"""CPU inference: PyTorch eager vs onnxruntime on one checkpoint — latency per image and images/s.

    python benchmarks/onnx_latency.py RUN/best.pt [--batch 64] [--repeats 50]

Writes benchmarks/results/onnx_latency.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _results import save_result
from medsight.checkpoint import load_model
from medsight.inference import OnnxPredictor, export_onnx


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    model, ckpt = load_model(args.checkpoint, "cpu")
    size = int(ckpt["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(args.checkpoint, Path(tmp) / "m.onnx")
        ort = OnnxPredictor(Path(tmp) / "m.onnx")
        one = torch.randn(1, 3, size, size)
        many = torch.randn(args.batch, 3, size, size)
        rows = {}
        with torch.inference_mode():
            rows["pytorch"] = (timed(lambda: model(one), args.repeats), timed(lambda: model(many), 10))
        rows["onnxruntime"] = (timed(lambda: ort.run(one.numpy()), args.repeats),
                               timed(lambda: ort.run(many.numpy()), 10))
    result = {"checkpoint": str(args.checkpoint), "model": ckpt["config"]["model"]["name"], "image_size": size,
              "batch": args.batch,
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"}
    for name, (lat, thr) in rows.items():
        result[name] = {"latency_ms_median": round(1000 * float(np.median(lat)), 2),
                        "latency_ms_p95": round(1000 * float(np.percentile(lat, 95)), 2),
                        "images_per_s_batched": round(args.batch / float(np.median(thr)), 1)}
    save_result("onnx_latency.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
