"""Checkpoints are data, not programs: written atomically, read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsight.config import Config, ConfigError, config_from_dict
from medsight.models import create_model

__all__ = ["CheckpointError", "save_atomic", "write_text_atomic", "load_checkpoint", "load_model", "FORMAT"]

FORMAT = "medsight-checkpoint-1"


class CheckpointError(ValueError):
    """A file that is not a usable medsight checkpoint."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a medsight checkpoint without running any code stored in it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or code-carrying files all land here
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a medsight checkpoint (no '{FORMAT}' marker); "
                              f"use the best.pt or last.pt of a medsight run folder")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode; returns ``(model, checkpoint)``."""
    ckpt = load_checkpoint(path)
    try:
        cfg: Config = config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its stored config is invalid: {exc}") from exc
    model = create_model(cfg.model.name, num_classes=len(ckpt["classes"]), img_size=ckpt["image_size"],
                         layout=cfg.model.layout)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {cfg.model.name} with {len(ckpt['classes'])} "
                              f"classes: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval(), ckpt
