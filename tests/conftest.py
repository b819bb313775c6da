"""Shared fixtures: small real image files on disk, in the layouts users have."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def blob_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Grayscale uint8 noise; class 1 carries its evidence, a bright square, in the top-left quadrant."""
    img = rng.integers(0, 60, (size, size)).astype(np.uint8)
    q, side = size // 2, max(6, size // 6)
    r0 = rng.integers(2, q - side - 2)
    c0 = rng.integers(2, q - side - 2)
    if label == 1:
        img[r0:r0 + side, c0:c0 + side] = 230
    return img


def write_class_folders(root: Path, n_per_class: int = 12, seed: int = 0, fmt: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(["normal", "pneumonia"]):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(blob_image(label, rng)).save(d / f"{name}_{i:03d}.{fmt}")
    return root


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "images")


@pytest.fixture
def small_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 40), ("val", 12), ("test", 12)):
        labels = np.array([i % 2 for i in range(n)], dtype=np.uint8)
        arrays[f"{split}_images"] = np.stack([blob_image(int(y), rng) for y in labels])
        arrays[f"{split}_labels"] = labels[:, None]
    path = tmp_path / "blobs.npz"
    np.savez(path, **arrays)
    return path


def tiny_overrides(out: Path, data: Path | str, epochs: int = 1) -> list[str]:
    """Settings for a run that takes seconds on a CPU."""
    return [f"data.path={data}", f"out={out}", f"train.epochs={epochs}", "data.image_size=32",
            "train.batch_size=16", "explain.gallery_per_class=1", "schedule.warmup_epochs=0",
            "explain.faithfulness_images=4", "plan=false"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A trained run folder (one epoch, 32 px) shared by the tests that only need a checkpoint."""
    from medsight.config import Config, apply_overrides
    from medsight.engine import train

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_class_folders(root / "images", n_per_class=16)
    cfg = apply_overrides(Config(), tiny_overrides(root / "run", data) + ["train.sharpness_batches=1"])
    train(cfg, progress=False)
    return root / "run"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a server or a DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict[str, str] | None = None, timeout: float = 120
                 ) -> tuple[subprocess.Popen, str]:
    """`medsight serve ARGS` in its own process, as a user starts it, once /health answers: (process, url)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "medsight", "serve", *args, "--port", str(port), "--device", "cpu"],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not start in {timeout:g} s")
