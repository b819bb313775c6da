"""ONNX export and onnxruntime inference.

The exported graph takes a normalized float32 batch ``image`` (N, 3, S, S) and returns ``probabilities``
(the fitted temperature and the task's activation inside the graph). The classes, input size, mean and std travel in the file's metadata, so
an ``.onnx`` file is used exactly like a checkpoint by ``medsight predict --onnx``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsight.checkpoint import load_trained
from medsight.config import DataConfig
from medsight.data.transforms import make_transform, to_three_channels
from medsight.errors import MedsightError, InputNotFoundError
from medsight.inference.predictor import BasePredictor
from medsight.inference.tta import tta_views
from medsight.tasks import task_from_state

__all__ = ["export_onnx", "OnnxPredictor", "ExportError"]


#: The data options that shape inference preprocessing; they travel in the exported file's metadata.
PREPROCESS = ("clahe", "clahe_clip", "resize", "preset", "graham")


class ExportError(MedsightError, RuntimeError):
    """The model could not be exported, or the exported graph disagrees with PyTorch."""


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
    wrapped = nn.Sequential(model, task.calibration_module(), task.activation_module()).eval()
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
        self.classes: list[str] = json.loads(meta["medsight_classes"])
        self.image_size = int(meta["medsight_image_size"])
        self.mean, self.std = json.loads(meta["medsight_mean"]), json.loads(meta["medsight_std"])
        self.name = meta.get("medsight_model", p.stem)
        self.task = task_from_state(json.loads(meta["medsight_task"])) if "medsight_task" in meta else \
            task_from_state({"kind": "single_label", "classes": self.classes})
        pre = json.loads(meta.get("medsight_preprocess", "{}"))
        dcfg = DataConfig(**{"clahe": "medsight_clahe_clip" in meta,
                             "clahe_clip": float(meta.get("medsight_clahe_clip", 2.0)),
                             **{k: v for k, v in pre.items() if k in PREPROCESS}})
        self.fov = dcfg.preset == "fundus"
        self.transform = make_transform(self.image_size, self.mean, self.std, train=False, cfg=dcfg)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def prepare(self, img: torch.Tensor) -> np.ndarray:
        return self.transform(to_three_channels(img)).numpy()

    def probabilities_batch(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack(list(prepared))
        if self.task.decision.get("tta"):  # the run chose test-time augmentation: the mean over its views, as
            return np.mean([self.run(v.numpy()) for v in tta_views(torch.from_numpy(x))], axis=0)  # in PyTorch
        return self.run(x)
