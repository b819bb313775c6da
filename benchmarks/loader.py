"""Loader speed: images/s per core for today's full-size decode, decoding for the size you need and the
prepared cache, on generated full-resolution files (4000×3000 JPEG, 3000×3000 16-bit PNG, 2500×2500 DICOM),
through medsight's dataset with the training transform at 224 px; the training loop's images/s on the cache
against its step-only images/s; and reading, validating and splitting a 250,000-row CSV manifest.

    python benchmarks/loader.py [--files 6] [--size 224] [--device auto]
    python benchmarks/loader.py --quick          # a smoke test: small files, few steps, a 5,000-row manifest

Decoding runs in one process on one thread (``torch.set_num_threads(1)``): images/s per core; today's path
and the reduced decode take turns for ``--decode-rounds`` rounds (as do the cache with the training
augmentation and with the default one), and each figure is the median with its range. The loop
against the step: a small model (resnet18 on CPU; coatnet_0_rw_224 in bf16 on a GPU), the same batches,
loop (DataLoader over the cache + step) and step alone (one batch already in memory) alternated, the
median of ``--repeats`` rounds. The manifest is timed in a fresh process (its peak memory is that
process's). Writes benchmarks/results/loader.json (loader_quick.json with --quick). Targets (issue 18):
reduced-size JPEG decode >= 15x today's path per core; the cache >= 1,000 images/s per core at 224 px with
the training augmentation; the loop on the cache within 10% of the step alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from _results import positive_int, save_result
from medsight.config import DataConfig
from medsight.data import ImageDataset
from medsight.data.sources import SplitData
from medsight.data.transforms import make_transform

#: kind -> (width, height) at full resolution
SIZES = {"jpeg": (4000, 3000), "png16": (3000, 3000), "dicom": (2500, 2500)}


def smooth_noise(h: int, w: int, rng: np.random.Generator, channels: int = 0) -> np.ndarray:
    """Smooth random structure in [0, 1] with fine grain, so that files compress as real images do."""
    import cv2

    shape = (h // 60 + 2, w // 60 + 2) + ((channels,) if channels else ())
    big = cv2.resize(rng.random(shape).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(big + 0.02 * rng.standard_normal(big.shape).astype(np.float32), 0, 1)


def write_files(folder: Path, kind: str, n: int, scale: float, seed: int = 0) -> list[str]:
    from pydicom import examples

    rng = np.random.default_rng(seed)
    w, h = (round(v * scale) for v in SIZES[kind])
    paths = []
    for i in range(n):
        p = folder / f"{kind}_{i}.{ {'jpeg': 'jpg', 'png16': 'png', 'dicom': 'dcm'}[kind]}"
        if kind == "jpeg":
            Image.fromarray((smooth_noise(h, w, rng, 3) * 255).astype(np.uint8)).save(p, quality=90)
        elif kind == "png16":
            Image.fromarray((smooth_noise(h, w, rng) * 4095).astype(np.uint16)).save(p)  # 12-bit detector values
        else:
            ds = examples.ct
            ds.Rows, ds.Columns = h, w
            ds.PixelData = (smooth_noise(h, w, rng) * 3000 - 1000).astype(np.int16).tobytes()
            ds.save_as(p)
        paths.append(str(p))
    return paths


def images_per_s(ds: ImageDataset, repeats: int, min_seconds: float = 0.0) -> float:
    """Images/s reading ``ds`` in order, ``repeats`` passes (more until ``min_seconds`` have passed)."""
    ds[0]  # warm-up: imports, first allocations
    t0 = time.perf_counter()
    n = passes = 0
    while passes < repeats or time.perf_counter() - t0 < min_seconds:
        for i in range(len(ds)):
            x, _ = ds[i]
            assert x is not None
            n += 1
        passes += 1
    return n / (time.perf_counter() - t0)


def alternate(datasets: list[ImageDataset], rounds: int, passes: int, min_seconds: float = 0.0) -> list[list[float]]:
    """Images/s of each data set, taking turns (A B A B ...) for ``rounds`` rounds: one list per data set."""
    out: list[list[float]] = [[] for _ in datasets]
    for _ in range(rounds):
        for k, ds in enumerate(datasets):
            out[k].append(images_per_s(ds, passes, min_seconds))
    return out


def med(values: list[float], digits: int) -> float:
    return round(float(np.median(values)), digits)


def spread(values: list[float], digits: int) -> list[float]:
    return [round(min(values), digits), round(max(values), digits)]


def write_manifest(folder: Path, paths: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,label"] + [f"{p},{'ab'[i % 2]}" for i, p in enumerate(paths)]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "labels.csv"


def cache_of(paths: list[str], folder: Path, cfg: DataConfig) -> tuple[SplitData, float]:
    """The prepared cache of ``paths`` (one worker) and its preparation speed in images/s."""
    from medsight.data.cache import open_cache, prepare_cache

    csv_path = write_manifest(folder / "src", paths)
    t0 = time.perf_counter()
    prepare_cache(cfg.model_copy(update={"path": str(csv_path), "allow_outside_paths": True}), folder / "cache",
                  workers=0)
    speed = len(paths) / (time.perf_counter() - t0)
    splits, *_ = open_cache(folder / "cache")
    return splits["all"], speed


def loop_against_step(folder: Path, cfg: DataConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Training images/s: DataLoader over a prepared cache + step, against the step alone on a batch in memory."""
    import timm

    from medsight.config import OptimConfig
    from medsight.data import make_loader
    from medsight.data.cache import open_cache, prepare_cache
    from medsight.engine.step import StepOptions, train_step
    from medsight.optim import create_optimizer

    n = args.batch * args.steps
    rng = np.random.default_rng(0)
    src = folder / "loop.npz"
    images = (np.stack([smooth_noise(256, 256, rng, 3) for _ in range(min(n, 64))]) * 255).astype(np.uint8)
    np.savez(src, images=images[np.arange(n) % len(images)], labels=np.arange(n) % 2)
    prepare_cache(cfg.model_copy(update={"path": str(src)}), folder / "loop_cache", workers=0)
    split = open_cache(folder / "loop_cache")[0]["all"]
    gpu = device.type == "cuda"
    name = args.gpu_model if gpu else args.cpu_model
    precision = "bf16" if gpu else "fp32"
    model = timm.create_model(name, num_classes=2).to(device).to(memory_format=torch.channels_last)
    opt = create_optimizer(model, OptimConfig(name="adamw", lr=1e-4), fused=gpu)
    loss_fn = torch.nn.CrossEntropyLoss()
    opts = StepOptions(precision=precision)
    tf = make_transform(args.size, [0.5] * 3, [0.5] * 3, train=True, cfg=cfg)
    workers = args.loader_workers if args.loader_workers is not None else (min(8, (os.cpu_count() or 1) - 1) if gpu else 0)
    loader = make_loader(ImageDataset(split, tf), args.batch, True, workers)
    x0, y0, _ = next(iter(loader))

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def step_only() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, x0.to(device, non_blocking=True), y0.to(device, non_blocking=True), opt, loss_fn,
                       opts=opts)
        sync()
        return args.steps * args.batch / (time.perf_counter() - t0)

    def loop() -> float:
        sync()
        t0 = time.perf_counter()
        k = 0
        for x, y, _ in loader:
            train_step(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True), opt, loss_fn, opts=opts)
            k += 1
        sync()
        return k * args.batch / (time.perf_counter() - t0)

    step_only()  # warm-up: kernels, allocator, loader workers
    loop()
    steps, loops = [], []
    for _ in range(args.rounds):  # alternate A/B so that drift in the machine's speed hits both
        steps.append(step_only())
        loops.append(loop())
    step_med, loop_med = float(np.median(steps)), float(np.median(loops))
    return {"model": name, "precision": precision, "device": torch.cuda.get_device_name(device) if gpu else "cpu",
            "batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds, "loader_workers": workers,
            "threads": torch.get_num_threads(), "step_only_images_per_s": round(step_med, 2),
            "loop_on_cache_images_per_s": round(loop_med, 2), "loop_over_step": round(loop_med / step_med, 3),
            "step_rounds": [round(v, 2) for v in steps], "loop_rounds": [round(v, 2) for v in loops]}


MANIFEST_TIMER = """
import json, resource, sys, time
from medsight.config import DataConfig
from medsight.data import load_data
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
bundle = load_data(DataConfig(path=sys.argv[1]))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
                  "splits": {k: len(v) for k, v in bundle.splits.items()}, "notes": bundle.notes}))
"""


def manifest_timing(folder: Path, rows: int) -> dict[str, Any]:
    """Read, validate and split a ``rows``-row manifest (4 images per patient, 3 classes, one file in a
    thousand missing) of tiny PNG files, in a fresh process."""
    import csv
    import io
    import json
    import subprocess

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    (folder / "img").mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for i in range(rows):
            name = f"img/{i:06d}.png"
            if i % 1000 != 7:
                (folder / name).write_bytes(data)
            w.writerow([name, ("normal", "effusion", "edema")[i % 3], f"p{i // 4}"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", MANIFEST_TIMER, str(folder / "labels.csv")], capture_output=True,
                         text=True, check=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "patients": rows // 4, "missing_files": sum(1 for i in range(rows) if i % 1000 == 7),
            "seconds": round(r["seconds"], 2), "peak_rss_mb": round(r["peak_rss_mb"]),
            "rss_growth_mb": round(r["rss_growth_mb"]), "splits": r["splits"],
            "missing_listed": any("do not exist" in n for n in r["notes"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=positive_int, default=6, help="files per kind")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=positive_int, default=1, help="passes over the files per round of a decode figure")
    p.add_argument("--decode-rounds", type=positive_int, default=5,
                   help="rounds in which the decode (and cache) variants take turns; the median is reported")
    p.add_argument("--device", default="auto", help="the training loop's device (auto: cuda when available)")
    p.add_argument("--cpu-model", default="resnet18")
    p.add_argument("--gpu-model", default="coatnet_0_rw_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=positive_int, default=24, help="training steps per round")
    p.add_argument("--rounds", type=positive_int, default=5, help="alternating loop/step rounds (the median is reported)")
    p.add_argument("--loader-workers", type=int, help="DataLoader workers (default: 0 on CPU, cores-1 up to 8 on a GPU)")
    p.add_argument("--manifest-rows", type=int, default=250_000)
    p.add_argument("--quick", action="store_true", help="smoke test: small files, few steps, a 5,000-row manifest")
    p.add_argument("--loop-only", action="store_true",
                   help="only the training loop against the step (writes loader_gpu_loop.json, or loader_cpu_loop.json)")
    args = p.parse_args()
    scale = 0.2 if args.quick else 1.0
    if args.quick:
        args.files, args.repeats, args.batch, args.steps, args.rounds, args.decode_rounds = 2, 1, 4, 2, 2, 2
        args.manifest_rows = min(args.manifest_rows, 5000)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(1)
    cfg = DataConfig(image_size=args.size, hflip=True, rotate_degrees=10)  # a typical training augmentation
    tf = make_transform(args.size, [0.5] * 3, [0.5] * 3, train=True, cfg=cfg)
    # medsight's default training augmentation (a horizontal flip): RandomAffine alone costs more than the rest
    tf_default = make_transform(args.size, [0.5] * 3, [0.5] * 3, train=True, cfg=DataConfig(image_size=args.size))
    result: dict[str, Any] = {"input_size": args.size, "files_per_kind": args.files, "threads": 1,
                              "transform": "training (resize, flip, rotate 10°, normalize); "
                                           "*_default_augmentation: medsight's default (resize, flip, normalize)",
                              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
                              "kinds": {}}
    if args.loop_only:
        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as tmp:
            row = {"machine": result["machine"], "transform": "training (resize, flip, rotate 10°, normalize)",
                   "loop_vs_step": loop_against_step(Path(tmp), cfg, args, device)}
        save_result(f"loader_{'gpu' if device.type == 'cuda' else 'cpu'}_loop.json", row)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for kind in SIZES:
            paths = write_files(Path(tmp), kind, args.files, scale)
            split = SplitData(labels=np.zeros(len(paths), dtype=np.int64), paths=paths)
            ds_today, ds_reduced = ImageDataset(split, tf, reduce=False), ImageDataset(split, tf)
            today, reduced = alternate([ds_today, ds_reduced], args.decode_rounds, args.repeats)
            cached, prepare_speed = cache_of(paths, Path(tmp) / f"cache_{kind}", cfg)
            secs = 0.2 if args.quick else 1.0
            from_cache, flip_only = alternate([ImageDataset(cached, tf), ImageDataset(cached, tf_default)],
                                              args.decode_rounds, args.repeats, min_seconds=secs)
            w, h = (round(v * scale) for v in SIZES[kind])
            speedups = [r / t for r, t in zip(reduced, today)]
            result["kinds"][kind] = {"source": f"{w}x{h}", "today_images_per_s": med(today, 2),
                                     "reduced_decode_images_per_s": med(reduced, 2),
                                     "speedup": med(speedups, 1), "speedup_range": spread(speedups, 1),
                                     "today_rounds": [round(v, 2) for v in today],
                                     "reduced_rounds": [round(v, 2) for v in reduced],
                                     "prepare_images_per_s": round(prepare_speed, 2),
                                     "cache_images_per_s": med(from_cache, 1),
                                     "cache_images_per_s_range": spread(from_cache, 1),
                                     "cache_images_per_s_default_augmentation": med(flip_only, 1),
                                     "cache_images_per_s_default_augmentation_range": spread(flip_only, 1)}
        torch.set_num_threads(os.cpu_count() or 1)  # the step uses the machine
        result["loop_vs_step"] = loop_against_step(Path(tmp), cfg, args, device)
        result["manifest"] = manifest_timing(Path(tmp) / "manifest", args.manifest_rows)
    result["targets"] = ("reduced-size JPEG decode >= 15x today's path per core; the prepared cache >= 1,000 "
                         "images/s per core at 224 px with the training augmentation; the training loop on the "
                         "cache within 10% of the step alone")
    if device.type != "cuda":
        result["not_measured"] = "no GPU: the coatnet_0_rw_224 (bf16) loop against the step was not measured"
    save_result("loader_quick.json" if args.quick else "loader.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
