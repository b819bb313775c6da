"""The model behind the page and the API: decode an upload, predict, explain (no trainer imported)."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.config import CamMethod, choices
from medsight.data.imageio import ImageReadError, ImageTooLargeError, read_image_bytes
from medsight.explainers.cam import border_score, overlay
from medsight.inference import load_predictor

__all__ = ["Service", "NOTICE", "MAX_UPLOAD_BYTES", "UnknownMethodError"]

NOTICE = "Research software: not for clinical use. Predictions must not guide diagnosis or treatment."
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
METHODS = choices(CamMethod)


class UnknownMethodError(ValueError):
    """An explanation method that medsight does not have."""


class UnknownClassError(ValueError):
    """A class or finding the model does not have."""


class Service:
    """Model, lock and the three operations behind both the page and the API."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
        self.predictor = load_predictor(checkpoint, device, onnx=False)  # a checkpoint or an ensemble.json
        # Grad-CAM registers hooks on the shared model: one explanation at a time. Plain predictions run
        # concurrently (inference mode, no shared state).
        self._cam_lock = threading.Lock()

    @property
    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"status": "ok", "model": p.name, "classes": p.classes, "image_size": p.image_size,
                "task": p.task.kind}

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
            raise UnknownClassError(f"unknown class or finding {name!r}; the model knows "
                                    f"{', '.join(self.predictor.classes)}")
        return self.predictor.classes.index(name)

    def explain(self, img: torch.Tensor, method: str = "gradcam", class_idx: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
        """(display image, overlay, border score) for ``img`` (the heatmap of output ``class_idx``, default:
        the task's explained output); both images H×W×3 in [0, 1]."""
        if method not in METHODS:
            raise UnknownMethodError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        disp = self.predictor.display(img)
        with self._cam_lock:
            heat = self.predictor.heatmap(img, method, class_idx=class_idx)
        border = float(border_score(torch.from_numpy(heat)[None])[0])
        return disp, overlay(disp, heat), border

    def explain_png(self, img: torch.Tensor, method: str, target: str | None = None) -> tuple[bytes, dict[str, Any]]:
        from PIL import Image

        index = self.class_index(target)
        result = self.predict(img)
        disp, ov, border = self.explain(img, method, index)
        explained = self.predictor.classes[index] if index is not None else result.get("explained", result["label"])
        side = np.concatenate([disp, ov], axis=1)
        big = Image.fromarray((side * 255).round().astype(np.uint8)).resize(
            (2 * max(256, disp.shape[1]), max(256, disp.shape[0])), Image.NEAREST)
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        return buf.getvalue(), {**result, "border_score": border, "method": method, "explained": explained}


#: Typed errors -> HTTP status codes (the API never searches error text).
STATUS: tuple[tuple[type[Exception], int], ...] = ((ImageTooLargeError, 413), (ImageReadError, 400),
                                                   (UnknownMethodError, 400), (UnknownClassError, 400))
