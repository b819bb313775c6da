"""ONNX export and onnxruntime inference.

The exported graph takes a normalized float32 batch ``image`` (N, 3, S, S) and returns ``probabilities``
(the fitted temperature and the task's activation inside the graph). The classes, input size, mean and std travel in the file's metadata, so
an ``.onnx`` file is used exactly like a checkpoint by ``medsight predict --onnx``.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsight.checkpoint import load_trained
from medsight.config import MAX_IMAGE_SIZE, ConfigError, DataConfig, config_from_dict
from medsight.data.transforms import make_transform, to_three_channels
from medsight.errors import MedsightError, InputNotFoundError
from medsight.inference.predictor import BasePredictor
from medsight.inference.tta import tta_views
from medsight.tasks import task_from_state

__all__ = ["export_onnx", "OnnxPredictor", "ExportError"]


#: The data options that shape inference preprocessing; they travel in the exported file's metadata.
PREPROCESS = ("clahe", "clahe_clip", "resize", "preset", "graham")


class ExportError(MedsightError, RuntimeError):
    """The model could not be exported, the exported graph disagrees with PyTorch, or an ``.onnx`` file's
    metadata is not what medsight writes."""


#: Bounds on what an exported file's metadata may say (a file is untrusted until these pass).
MAX_CLASSES = 10_000
_MAX_META_CHARS = 1 << 20


class _Metadata:
    """An exported file's medsight metadata, each field parsed and checked; errors name the file and field."""

    def __init__(self, path: Path, meta: dict[str, str]) -> None:
        self.path, self.meta = path, meta

    def fail(self, key: str, what: str) -> ExportError:
        return ExportError(f"{self.path}: ONNX metadata field {key} {what}, got {reprlib.repr(self.meta.get(key))}")

    def json(self, key: str, default: str | None = None) -> Any:
        raw = self.meta.get(key, default)
        if raw is None:
            raise self.fail(key, "is missing")
        if len(raw) > _MAX_META_CHARS:
            raise self.fail(key, f"is longer than {_MAX_META_CHARS:,} characters")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise self.fail(key, "is not valid JSON") from None

    def classes(self) -> list[str]:
        v = self.json("medsight_classes")
        if not (isinstance(v, list) and 1 <= len(v) <= MAX_CLASSES and all(isinstance(c, str) and 0 < len(c) <= 200
                                                                           for c in v) and len(set(v)) == len(v)):
            raise self.fail("medsight_classes", f"must be a JSON list of 1 to {MAX_CLASSES} distinct names")
        return v

    def image_size(self) -> int:
        raw = self.meta.get("medsight_image_size", "")
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6 and 16 <= int(raw) <= MAX_IMAGE_SIZE):
            raise self.fail("medsight_image_size", f"must be an integer from 16 to {MAX_IMAGE_SIZE}")
        return int(raw)

    def triple(self, key: str, positive: bool) -> list[float]:
        v = self.json(key)
        if not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
                for x in v)):
            raise self.fail(key, "must be three finite numbers" + (" above 0" if positive else ""))
        return [float(x) for x in v]

    def task(self, classes: list[str]) -> Any:
        state = self.json("medsight_task", json.dumps({"kind": "single_label", "classes": classes}))
        if not isinstance(state, dict) or state.get("classes") != classes:
            raise self.fail("medsight_task", "must be a JSON object with the same classes as medsight_classes")
        try:
            return task_from_state(state)
        except Exception as exc:  # noqa: BLE001 - a hand-made task state fails in many ways; name the field
            raise self.fail("medsight_task", f"is not a medsight task ({type(exc).__name__}: "
                                             f"{reprlib.repr(str(exc))})") from None

    def data_config(self) -> DataConfig:
        pre = self.json("medsight_preprocess", "{}")
        if not isinstance(pre, dict) or set(pre) - set(PREPROCESS):
            raise self.fail("medsight_preprocess", f"must be a JSON object of {', '.join(PREPROCESS)}")
        clip = self.meta.get("medsight_clahe_clip")
        options = {**pre, "clahe": clip is not None}
        if clip is not None:
            try:
                options["clahe_clip"] = float(clip) if len(clip) <= 32 else math.nan
            except ValueError:
                options["clahe_clip"] = math.nan
        try:
            return config_from_dict({"data": options}).data
        except ConfigError as exc:
            key = "medsight_clahe_clip" if "clahe_clip" in str(exc) else "medsight_preprocess"
            raise self.fail(key, f"is not a valid preprocessing setting ({exc})") from None


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 18, check: bool = True,
                atol: float = 1e-4) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out`` (dynamic batch); with ``check``, compare onnxruntime to PyTorch.

    Uses torch's ``torch.export``-based exporter: the older TorchScript exporter silently produces a wrong
    graph for timm's CoAtNet (probabilities off by > 0.1), which this check catches.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx, onnxscript and onnxruntime packages: "
                          "pip install 'medsight[export]'") from exc
    trained = load_trained(checkpoint, "cpu")
    model, ckpt, task, size = trained.model, trained.checkpoint, trained.task, trained.image_size
    # calibrated probabilities: the fitted temperature divides the logits inside the graph
    wrapped = nn.Sequential(model, task.rules.calibration_module(), task.head.activation_module()).eval()
    example = torch.randn(2, 3, size, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=["image"], output_names=["probabilities"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True,
                          opset_version=opset, external_data=False, verbose=False)
        proto = onnx.load(str(tmp))
        meta = {"medsight_classes": json.dumps(ckpt["classes"]), "medsight_image_size": str(size),
                "medsight_mean": json.dumps(list(ckpt["mean"])), "medsight_std": json.dumps(list(ckpt["std"])),
                "medsight_model": ckpt["config"]["model"]["name"], "medsight_task": json.dumps(task.state())}
        data = ckpt["config"].get("data", {})
        if data.get("clahe"):
            meta["medsight_clahe_clip"] = str(data.get("clahe_clip", 2.0))
        meta["medsight_preprocess"] = json.dumps({k: data[k] for k in PREPROCESS if k in data})
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(tmp))
        result: dict[str, Any] = {"out": str(out), "opset": opset}
        if check:
            x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = wrapped(x).numpy()
            got = OnnxPredictor(tmp).run(x.numpy())
            diff = float(np.abs(got - ref).max())
            result["max_abs_diff"] = diff
            if diff > atol:
                raise ExportError(f"the exported graph disagrees with PyTorch: max |Δp| = {diff:.2e} > {atol:g}")
        tmp.replace(out)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types; name the cause
        raise ExportError(f"ONNX export of {ckpt['config']['model']['name']} failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return result


class OnnxPredictor(BasePredictor):
    """An exported model in onnxruntime, with the same preprocessing as :class:`medsight.api.Predictor`."""

    def __init__(self, path: str | Path, threads: int = 0, spinning: bool = True) -> None:
        """``spinning=False`` lets onnxruntime's idle threads sleep instead of spin-waiting for work: slower by
        a little per call, but a server's decoding threads get the cores between batches."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError("ONNX inference needs onnxruntime: pip install 'medsight[export]'") from exc
        p = Path(path)
        if not p.is_file():
            raise InputNotFoundError(f"ONNX model not found: {p}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{p} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if "medsight_classes" not in meta:
            raise ExportError(f"{p} was not exported by medsight (no class list in its metadata)")
        m = _Metadata(p, meta)
        self.classes: list[str] = m.classes()
        self.image_size = m.image_size()
        self.mean, self.std = m.triple("medsight_mean", positive=False), m.triple("medsight_std", positive=True)
        self.name = meta.get("medsight_model", p.stem)[:200]
        self.task = m.task(self.classes)
        dcfg = m.data_config()
        self._check_graph(m)
        self.fov = dcfg.preset == "fundus"
        self.transform = make_transform(self.image_size, self.mean, self.std, train=False, cfg=dcfg)

    def _check_graph(self, m: _Metadata) -> None:
        """The graph's fixed input and output sizes agree with the metadata."""
        (inp,), outs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inp.shape)
        if len(shape) != 4 or any(isinstance(got, int) and got != want
                                  for got, want in zip(shape[1:], (3, self.image_size, self.image_size))):
            raise m.fail("medsight_image_size", f"disagrees with the graph's input shape {shape}")
        width = outs[0].shape[-1] if outs and outs[0].shape else None
        if isinstance(width, int) and width not in (len(self.classes), self.task.head.num_outputs):
            raise m.fail("medsight_classes", f"disagrees with the graph's {width} outputs")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def prepare(self, img: torch.Tensor) -> np.ndarray:
        return self.transform(to_three_channels(img)).numpy()

    def probabilities_batch(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack(list(prepared))
        if self.task.rules.tta:  # the run chose test-time augmentation: the mean over its views, as
            return np.mean([self.run(v.numpy()) for v in tta_views(torch.from_numpy(x))], axis=0)  # in PyTorch
        return self.run(x)
