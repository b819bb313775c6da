"""Checkpoints are data, not programs: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds the weights, the resolved config, the task (kind, classes, fitted decision rule),
the input size and normalization. Anything else — a pickle carrying code, a hand-edited file with a
missing key or a value of the wrong type — is refused with a message that names the problem.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsight.config import Config, ConfigError, config_from_dict
from medsight.errors import MedsightError
from medsight.models import create_model, install_head
from medsight.tasks import RulesError, Task, TaskConfigError, task_from_checkpoint
from medsight.utils.files import save_atomic, write_text_atomic

__all__ = ["CheckpointError", "save_atomic", "write_text_atomic", "load_checkpoint", "load_model", "load_trained", "Trained", "FORMAT"]

FORMAT = "medsight-checkpoint-1"


class CheckpointError(MedsightError, ValueError):
    """A file that is not a usable medsight checkpoint."""


def _check_fields(ckpt: dict[str, Any], p: Path) -> None:
    """The keys every command reads, with the types it expects (a hand-edited file fails here, by name)."""
    for key in ("model", "config", "classes", "image_size", "mean", "std"):
        if key not in ckpt:
            raise CheckpointError(f"{p} lacks the '{key}' entry of a medsight checkpoint")
    if not isinstance(ckpt["image_size"], int) or isinstance(ckpt["image_size"], bool) or ckpt["image_size"] < 1:
        raise CheckpointError(f"{p}: image_size must be a positive integer, got {ckpt['image_size']!r}")
    for key in ("mean", "std"):
        v = ckpt[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise CheckpointError(f"{p}: {key} must be three numbers (one per channel), got {v!r}")
    if not all(s > 0 for s in ckpt["std"]):
        raise CheckpointError(f"{p}: std must be positive, got {ckpt['std']!r}")
    if not (isinstance(ckpt["classes"], list) and len(ckpt["classes"]) >= 1):
        raise CheckpointError(f"{p}: classes must be a list of names, got {ckpt['classes']!r}")
    task = ckpt.get("task")
    if task is not None and (not isinstance(task, dict) or list(task.get("classes", [])) != list(ckpt["classes"])):
        raise CheckpointError(f"{p}: its classes {ckpt['classes']!r} disagree with its task's "
                              f"{task.get('classes') if isinstance(task, dict) else task!r}")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{p}: 'model' must hold the weights (a state dict)")


#: The pickle opcodes that import a name or build an object from one: what ``weights_only`` refuses.
_OBJECT_OPS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD",
                         "EXT1", "EXT2", "EXT4"})
_MAX_PICKLE = 64 * 1024 * 1024


def _pickled_imports(p: Path) -> list[str] | None:
    """The names a checkpoint's pickle imports to build objects (in order; opcodes read, nothing run), or
    None when no complete pickle can be read (a truncated or foreign file)."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None or z.getinfo(name).file_size > _MAX_PICKLE:
                    return None
                data = z.read(name)
        else:
            with p.open("rb") as fh:
                data = fh.read(_MAX_PICKLE)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return None
    found: list[str] = []
    stream = io.BytesIO(data)
    for n in range(4):  # torch's legacy format writes a few pickles in a row, then raw storage bytes
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
                elif op.name in _OBJECT_OPS and not found:
                    found.append(f"an object built by {op.name}")
        except (ValueError, EOFError, pickle.UnpicklingError):
            return None if n == 0 else found
        if stream.tell() >= len(data):
            break
    return found


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a medsight checkpoint without running any code stored in it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or code-carrying files all land here
        # torch's message advises loading unsafely; medsight never does, so it says what the file is instead,
        # from the pickle's own opcodes (torch's wording differs by what was refused and by version)
        imports = _pickled_imports(p) if isinstance(exc, pickle.UnpicklingError) else None
        if imports:
            shown = [n for n in imports if not n.startswith(("torch.", "collections.OrderedDict"))] or imports
            raise CheckpointError(f"{p} holds code/objects, refused: its pickle imports "
                                  f"{', '.join(dict.fromkeys(n[:80] for n in shown[:3]))}; a medsight checkpoint "
                                  f"holds only data, and medsight never runs code from a checkpoint") from None
        raise CheckpointError(f"{p} is not a readable checkpoint (truncated, or not a torch file: "
                              f"{type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a medsight checkpoint (no '{FORMAT}' marker); "
                              f"use the best.pt or last.pt of a medsight run folder")
    _check_fields(ckpt, p)
    return ckpt


def _mismatch(exc: RuntimeError, limit: int = 5) -> str:
    """The first few missing / unexpected / mis-shaped keys of a failed ``load_state_dict``."""
    lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
    return "; ".join(ln[:300] for ln in lines[:limit]) + (f" (and {len(lines) - limit} more)" if len(lines) > limit else "")


@dataclass(frozen=True)
class Trained:
    """A checkpoint loaded once: the model in eval mode, its task (with the rules fitted on validation), its
    config, and the raw entries (input size, normalization) that :meth:`transform` is built from. What evaluate,
    predict, explain, serve and export share instead of rebuilding each part from the checkpoint's dict."""

    model: nn.Module
    task: Task
    config: Config
    checkpoint: dict[str, Any]
    path: Path

    @property
    def image_size(self) -> int:
        return int(self.checkpoint["image_size"])

    @property
    def name(self) -> str:
        """The backbone's name."""
        return self.config.model.name

    def transform(self) -> Any:
        """The inference preprocessing: the input size, normalization and data options (e.g. CLAHE) it was
        trained with."""
        from medsight.data.transforms import make_transform

        return make_transform(self.image_size, self.checkpoint["mean"], self.checkpoint["std"], train=False,
                              cfg=self.config.data)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode; returns ``(model, checkpoint)``."""
    trained = load_trained(path, device)
    return trained.model, trained.checkpoint


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """Read a checkpoint once into a :class:`Trained` (model on ``device``, in eval mode)."""
    ckpt = load_checkpoint(path)
    try:
        cfg: Config = config_from_dict(ckpt["config"])
        task = task_from_checkpoint(ckpt)
    except (ConfigError, TaskConfigError, RulesError) as exc:
        raise CheckpointError(f"{path}: its stored config is invalid: {exc}") from None
    model = create_model(cfg.model.name, num_classes=task.head.num_outputs, img_size=ckpt["image_size"],
                         layout=cfg.model.layout)
    install_head(model, cfg.train.head, task.head.num_outputs, cfg.train.cosine_scale, cfg.train.cosine_learn_scale)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {cfg.model.name} with {task.head.num_outputs} outputs: "
                              f"{_mismatch(exc)}") from None
    return Trained(model.to(device).eval(), task, cfg, ckpt, Path(path))
