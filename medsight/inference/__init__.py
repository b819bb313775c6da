"""Inference without training or reporting: PyTorch checkpoints (predictor.py), exported ONNX models
(onnx.py) and ensembles (ensemble.py) behind one interface, chosen by :func:`load_predictor`."""

from __future__ import annotations

from pathlib import Path

from medsight.inference.ensemble import EnsembleFileError, EnsemblePredictor, combine
from medsight.inference.onnx import ExportError, OnnxPredictor, export_onnx
from medsight.inference.predictor import (BasePredictor, NoImagesError, Predictor, collect_images, eval_transform,
                                          predict_loader)

__all__ = ["BasePredictor", "Predictor", "OnnxPredictor", "EnsemblePredictor", "load_predictor", "collect_images",
           "eval_transform", "predict_loader", "export_onnx", "combine", "ExportError", "EnsembleFileError",
           "NoImagesError"]


def load_predictor(checkpoint: str | Path, device: str = "auto", onnx: bool | None = None,
                   onnx_spinning: bool = True) -> BasePredictor:
    """A :class:`Predictor` for a checkpoint, an :class:`OnnxPredictor` for an exported ``.onnx`` file, or
    an :class:`EnsemblePredictor` for an ``ensemble.json``. ``onnx_spinning=False``: onnxruntime's idle
    threads sleep (for a server, whose other threads need the cores)."""
    if onnx or (onnx is None and str(checkpoint).endswith(".onnx")):
        return OnnxPredictor(checkpoint, spinning=onnx_spinning)
    if str(checkpoint).endswith(".json"):
        return EnsemblePredictor(checkpoint, device)
    return Predictor(checkpoint, device)
