"""Device choice from a config string."""

from __future__ import annotations

import torch

from medsight.errors import MedsightError

__all__ = ["resolve_device", "DeviceError"]


class DeviceError(MedsightError, ValueError):
    """A device that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; a named CUDA device without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"train.device is {name!r} but no CUDA GPU is available; use 'cpu' or 'auto'")
    return dev
