"""The model behind the page and the API: decode an upload, predict (one at a time or in micro-batches),
explain (no trainer imported)."""

from __future__ import annotations

import concurrent.futures
import io
import reprlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.config import CamMethod, choices
from medsight.data.imageio import ImageReadError, ImageTooLargeError, read_image_bytes
from medsight.errors import MedsightError
from medsight.explainers.cam import border_score, overlay
from medsight.inference import OnnxPredictor, load_predictor
from medsight.serve.batching import Admission, BatchSettings, MicroBatcher, ServerBusyError

__all__ = ["Service", "NOTICE", "MAX_UPLOAD_BYTES", "UnknownMethodError", "ExplainUnavailableError"]

NOTICE = "Research software: not for clinical use. Predictions must not guide diagnosis or treatment."
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
METHODS = choices(CamMethod)


class UnknownMethodError(MedsightError, ValueError):
    """An explanation method that medsight does not have."""


class UnknownClassError(MedsightError, ValueError):
    """A class or finding the model does not have."""


class ExplainUnavailableError(MedsightError, RuntimeError):
    """Explanations need the PyTorch model (an exported ONNX model has no gradients to follow)."""


class Service:
    """Model, batcher, admission and the operations behind both the page and the API.

    ``checkpoint`` is a checkpoint, an ``ensemble.json`` or an exported ``.onnx`` model (``onnx=True``
    for another file name); the ONNX model runs in onnxruntime without PyTorch's model code, and cannot
    explain. ``batching`` says how predictions are gathered (:class:`BatchSettings`).
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", onnx: bool | None = None,
                 batching: BatchSettings | None = None) -> None:
        self.predictor = load_predictor(checkpoint, device, onnx=onnx, onnx_spinning=False)
        self.batching = batching or BatchSettings()
        self.admission = Admission(self.batching.queue_limit)
        self.batcher = MicroBatcher(self._run_batch, self.batching.max_batch, self.batching.max_wait_ms) \
            if self.batching.enabled else None
        # Grad-CAM registers hooks on the shared model: one explanation at a time. Plain predictions run
        # concurrently (inference mode, no shared state).
        self._cam_lock = threading.Lock()

    @property
    def can_explain(self) -> bool:
        return not isinstance(self.predictor, OnnxPredictor)

    @property
    def info(self) -> dict[str, Any]:
        p, b = self.predictor, self.batching
        return {"status": "ok", "model": p.name, "classes": p.classes, "image_size": p.image_size,
                "task": p.task.kind, "runtime": "pytorch" if self.can_explain else "onnxruntime",
                "batching": {"enabled": b.enabled, "max_batch": b.max_batch, "max_wait_ms": b.max_wait_ms,
                             "queue_limit": b.queue_limit, "batches_run": self.batcher.batches if self.batcher else 0,
                             "images_batched": self.batcher.images if self.batcher else 0}}

    def close(self) -> None:
        """Finish the predictions already gathered and stop the batcher."""
        if self.batcher is not None:
            self.batcher.close()

    def _run_batch(self, prepared: list[Any]) -> list[dict[str, Any]]:
        with torch.inference_mode():
            probs = self.predictor.probabilities_batch(prepared)
        return [self.predictor.task.readout.answer(p) for p in probs]

    def prepare(self, data: bytes, name: str) -> Any:
        """Decode an upload and fit it to the model's input (the per-image work, done in the request's thread)."""
        img = self.decode(data, name)
        with torch.inference_mode():
            return self.predictor.prepare(img)

    def submit(self, prepared: Any) -> concurrent.futures.Future:
        """The task's record for a prepared image, from the next micro-batch (or at once without batching)."""
        if self.batcher is not None:
            return self.batcher.submit(prepared)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(self._run_batch([prepared])[0])
        return fut

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        if len(data) > MAX_UPLOAD_BYTES:
            raise ImageTooLargeError(f"{name}: more than the {MAX_UPLOAD_BYTES:,}-byte upload limit")
        return read_image_bytes(data, name)

    def predict(self, img: torch.Tensor) -> dict[str, Any]:
        with torch.inference_mode():
            return self.predictor.predict(img)

    def class_index(self, name: str | None) -> int | None:
        """The output of a class or finding named by the user (None: the task's default)."""
        if not name:
            return None
        if name not in self.predictor.classes:
            raise UnknownClassError(f"unknown class or finding {reprlib.repr(name)}; the model knows "
                                    f"{', '.join(self.predictor.classes)}")
        return self.predictor.classes.index(name)

    def explained_index(self, result: dict[str, Any], target: str | None = None) -> int:
        """The output a heatmap of this prediction shows: the class or finding the user named, else the one the
        prediction ``result`` explains (its decision, with the run's TTA when it uses it)."""
        index = self.class_index(target)
        return index if index is not None else self.predictor.classes.index(result.get("explained", result["label"]))

    def explain(self, img: torch.Tensor, method: str = "gradcam", class_idx: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
        """(display image, overlay, border score) for ``img`` (the heatmap of output ``class_idx``, default:
        the task's explained output); both images H×W×3 in [0, 1]."""
        if method not in METHODS:
            raise UnknownMethodError(f"unknown method {reprlib.repr(method)}; choose from {', '.join(METHODS)}")
        if not self.can_explain:
            raise ExplainUnavailableError("explanations need the PyTorch checkpoint: this server runs an exported "
                                          "ONNX model, which can predict but not explain")
        disp = self.predictor.display(img)
        with self._cam_lock:
            heat = self.predictor.heatmap(img, method, class_idx=class_idx)
        border = float(border_score(torch.from_numpy(heat)[None])[0])
        return disp, overlay(disp, heat), border

    def explain_png(self, img: torch.Tensor, method: str, target: str | None = None) -> tuple[bytes, dict[str, Any]]:
        from PIL import Image

        self.class_index(target)  # an unknown name is refused before any work
        result = self.predict(img)
        index = self.explained_index(result, target)
        disp, ov, border = self.explain(img, method, index)
        explained = self.predictor.classes[index]
        side = np.concatenate([disp, ov], axis=1)
        big = Image.fromarray((side * 255).round().astype(np.uint8)).resize(
            (2 * max(256, disp.shape[1]), max(256, disp.shape[0])), Image.NEAREST)
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        return buf.getvalue(), {**result, "border_score": border, "method": method, "explained": explained}


#: Typed errors -> HTTP status codes (the API never searches error text).
STATUS: tuple[tuple[type[Exception], int], ...] = ((ImageTooLargeError, 413), (ImageReadError, 400),
                                                   (UnknownMethodError, 400), (UnknownClassError, 400),
                                                   (ExplainUnavailableError, 501), (ServerBusyError, 429))
