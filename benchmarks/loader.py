"""Loader speed per core: today's full-size decode against decoding for the size you need, on generated
full-resolution files (4000×3000 JPEG, 3000×3000 16-bit PNG, 2500×2500 DICOM), through medsight's dataset
with the training transform at 224 px.

    python benchmarks/loader.py [--files 6] [--size 224]
    python benchmarks/loader.py --quick          # a smoke test: small files, two of each

One process, one thread (``torch.set_num_threads(1)``): images/s per core. Writes
benchmarks/results/loader.json (loader_quick.json with --quick). Target (issue 18): the reduced-size JPEG
decode at least 15× today's path per core.
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

from _results import save_result
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


def images_per_s(ds: ImageDataset, repeats: int) -> float:
    ds[0]  # warm-up: imports, first allocations
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for i in range(len(ds)):
            x, _ = ds[i]
            assert x is not None
            n += 1
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=6, help="files per kind")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke test: files at a fifth of full size, two per kind")
    args = p.parse_args()
    scale = 0.2 if args.quick else 1.0
    if args.quick:
        args.files, args.repeats = 2, 1
    torch.set_num_threads(1)
    cfg = DataConfig(hflip=True, rotate_degrees=10)  # a typical training augmentation
    tf = make_transform(args.size, [0.5] * 3, [0.5] * 3, train=True, cfg=cfg)
    result: dict[str, Any] = {"input_size": args.size, "files_per_kind": args.files, "threads": 1,
                              "transform": "training (resize, flip, rotate 10°, normalize)",
                              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
                              "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in SIZES:
            paths = write_files(Path(tmp), kind, args.files, scale)
            split = SplitData(labels=np.zeros(len(paths), dtype=np.int64), paths=paths)
            today = images_per_s(ImageDataset(split, tf, reduce=False), args.repeats)
            reduced = images_per_s(ImageDataset(split, tf), args.repeats)
            w, h = (round(v * scale) for v in SIZES[kind])
            result["kinds"][kind] = {"source": f"{w}x{h}", "today_images_per_s": round(today, 2),
                                     "reduced_decode_images_per_s": round(reduced, 2),
                                     "speedup": round(reduced / today, 1)}
    result["targets"] = "reduced-size JPEG decode >= 15x today's path per core"
    result["not_measured"] = ("the prepared cache, the training loop on it and the 250k-row manifest are not built "
                              "yet; no GPU was available for the coatnet_0_rw_224 loop-vs-step comparison")
    save_result("loader_quick.json" if args.quick else "loader.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
