"""medsight: medical image classifiers that generalize (CoAtNet + SAM) and show what they looked at (Grad-CAM).

The public API — ``train``, ``evaluate``, ``predict``, ``explain``, ``explain_files``, ``SAM`` — is loaded
on first use, so ``import medsight.serve`` (or any one layer) does not pull in the training engine.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_PUBLIC = {
    "train": "medsight.engine.trainer",
    "dry_run": "medsight.engine.dry_run",
    "evaluate": "medsight.api",
    "predict": "medsight.api",
    "explain_files": "medsight.api",
    "explain": "medsight.explainers.cam",
    "SAM": "medsight.optim.sam",
    "LookSAM": "medsight.optim.sam",
    "Config": "medsight.config",
    "load_config": "medsight.config",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'medsight' has no attribute {name!r}")
