"""Build backbones: every model comes from timm's registry (medsight's CoAtNets and adapters included)."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from medsight.models.coatnet import COATNETS
from medsight.models.errors import ModelError

__all__ = ["create_model", "load_weights", "list_models", "prepare_compile", "data_config", "count_parameters"]

log = logging.getLogger(__name__)


def list_models(pattern: str = "") -> list[str]:
    """Every backbone name medsight can build (timm's registry, medsight's CoAtNets included)."""
    return timm.list_models(pattern or "*")


def _unknown_model(name: str) -> ModelError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else " `medsight models` lists them."
    return ModelError(f"unknown model {name!r}: timm has no backbone of that name.{hint}")


def create_model(name: str, num_classes: int, img_size: int, pretrained: bool = False,
                 weights: str | None = None, layout: str | None = None, drop_path_rate: float = 0.0) -> nn.Module:
    """Build a timm backbone with a fresh ``num_classes`` head.

    ``pretrained`` downloads timm's weights (for medsight's CoAtNets: the closest timm CoAtNet's weights,
    which only fit the default layout); ``weights`` loads a local file instead.
    """
    if not timm.is_model(name):
        raise _unknown_model(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    stride = 32 if name.startswith(("coatnet", "maxvit", "maxxvit")) else None
    if stride and img_size % stride:
        lo = max(stride, img_size // stride * stride)
        raise ModelError(f"{name} needs data.image_size to be a multiple of {stride} (its attention windows "
                         f"tile the final feature map); got {img_size}, try {lo} or {lo + stride}")
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    fixed = timm.models.get_pretrained_cfg_value(name, "fixed_input_size")
    if fixed or name in COATNETS or name.startswith("cnn_transformer_"):
        kwargs["img_size"] = img_size
    if name in COATNETS:
        kwargs["layout"] = layout or "CCTT"
    elif layout:
        raise ModelError(f"model.layout applies to medsight's CoAtNets ({', '.join(COATNETS)}), not {name}")
    if pretrained and weights:
        raise ModelError("give either --pretrained (download timm's weights) or --weights PATH, not both")
    if pretrained and name in COATNETS:
        source = COATNETS[name][3]
        if source is None or (layout or "CCTT").upper() != "CCTT":
            raise ModelError(f"no pretrained weights exist for {name} with layout {layout or 'CCTT'}; "
                             f"train from scratch or pass --weights PATH")
        kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": f"timm/{source.split('.')[0]}.{source.split('.')[1]}"}
        model = _download(lambda: timm.create_model(source, pretrained=True, **{k: v for k, v in kwargs.items()
                                                                                 if k not in ("layout", "pretrained_cfg_overlay")}), name)
        return model
    if pretrained:
        return _download(lambda: timm.create_model(name, pretrained=True, **kwargs), name)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights:
        load_weights(model, weights)
    return model


def _download(build: Callable[[], nn.Module], name: str) -> nn.Module:
    try:
        return build()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"could not get pretrained weights for {name} ({type(exc).__name__}: {exc}). "
                         f"Without network access, download them elsewhere and pass --weights PATH, or train "
                         f"from scratch without --pretrained.") from exc


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load backbone weights from a local .safetensors / .pt / .pth file; a mismatched head is left fresh."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not usable weights
        raise ModelError(f"cannot read weights from {p}: {exc}") from exc
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{p} does not hold a state dict")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ModelError(f"none of the {len(state)} tensors in {p} fit this model; is it for another architecture?")
    skipped = sorted(set(state) - set(fitting))
    missing = sorted(set(own) - set(fitting))
    model.load_state_dict(fitting, strict=False)
    log.info("loaded %d tensors from %s (%d skipped, %d left at init: %s)", len(fitting), p, len(skipped),
             len(missing), ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))


def prepare_compile(model: nn.Module) -> int:
    """Turn timm's fused attention off in ``model`` before ``torch.compile``; returns how many layers changed.

    Inductor fails on CoAtNet's relative-position bias passed to fused SDPA. timm reads its global
    ``set_fused_attn`` flag when a layer is built, so the flag must be cleared on the built layers.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "fused_attn", False):
            module.fused_attn = False
            changed += 1
    return changed


def data_config(model: nn.Module) -> dict[str, Any]:
    """Mean/std/interpolation from timm's own data config of the model."""
    return timm.data.resolve_model_data_config(model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
