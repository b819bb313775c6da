"""What timm lacks: the layer Grad-CAM reads per architecture family, and layer groups for freezing."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from medsight.models.errors import ModelError

__all__ = ["CamTarget", "cam_target", "layer_groups", "freeze_stages"]


@dataclass
class CamTarget:
    """The layer Grad-CAM reads, and how its output becomes (B, C, H, W)."""

    layer: nn.Module
    name: str
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


def _nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _tokens_to_nchw(prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(t: torch.Tensor) -> torch.Tensor:
        t = t[:, prefix:, :]
        side = int(round(t.shape[1] ** 0.5))
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
    return reshape


def _family_target(model: nn.Module) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    cls = type(model).__name__
    if cls in ("MaxxVit", "ConvNeXt", "RegNet", "CoaT"):
        return "stages.%d" % (len(model.stages) - 1), None
    if cls == "CnnTransformer":
        return "proj", None  # the CNN's projected feature map, before it becomes tokens
    if cls in ("ResNet",):
        return "layer4", None
    if cls in ("DenseNet",):
        return "features", None
    if cls in ("EfficientNet", "MobileNetV3"):
        return "bn2", None
    if cls in ("SwinTransformerV2", "SwinTransformer"):
        return "layers.%d" % (len(model.layers) - 1), _nhwc_to_nchw
    if cls in ("VisionTransformer", "Eva", "DeiT"):
        prefix = getattr(model, "num_prefix_tokens", 1)
        return "blocks.%d.norm1" % (len(model.blocks) - 1), _tokens_to_nchw(prefix)
    if hasattr(model, "stages"):
        return "stages.%d" % (len(model.stages) - 1), None
    if hasattr(model, "layer4"):
        return "layer4", None
    raise ModelError(f"no default Grad-CAM layer for {cls}; pass a target layer name")


def _deepest_usable_stage(model: nn.Module, default: str, img_size: int, min_side: int) -> str:
    """For small inputs the last stage can be 1×1 or 2×2, which makes a flat heatmap: step back to the
    deepest stage (per timm's ``feature_info``) whose map is at least ``min_side`` pixels on a side."""
    info = getattr(model, "feature_info", None)
    if not info or img_size is None:
        return default
    entries = list(info) if isinstance(info, list) else [
        {"module": m, "reduction": r} for m, r in zip(info.module_name(), info.reduction())]
    if not entries or entries[-1].get("module") != default:
        return default
    for entry in reversed(entries):
        if img_size // entry["reduction"] >= min_side:
            return entry["module"]
    return entries[0]["module"]


def cam_target(model: nn.Module, name: str | None = None, img_size: int | None = None,
               min_side: int = 4) -> CamTarget:
    """The Grad-CAM target of ``model``: ``name`` (a dotted module path) or the family's last stage
    (or, for inputs so small that it is under ``min_side``×``min_side``, the deepest stage that is not)."""
    inner = getattr(model, "module", model)  # DDP wrapper
    try:
        default_name, reshape = _family_target(inner)
    except ModelError:
        if name is None:
            raise
        default_name, reshape = name, None  # a model of the user's own: the named layer, as it is
    if reshape is None and name is None:
        default_name = _deepest_usable_stage(inner, default_name, img_size, min_side)
    name = name or default_name
    modules = dict(inner.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ModelError(f"target layer {name!r} does not exist in {type(inner).__name__}.{hint}")
    return CamTarget(layer=modules[name], name=name, reshape=reshape if name == default_name else None)


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names by depth, via timm's group matcher: stem, each stage, then the head."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ModelError(f"{type(model).__name__} defines no layer groups (timm's group_matcher)")
    return [list(names) for names in group_parameters(model, model.group_matcher(coarse=True)).values()]


def freeze_stages(model: nn.Module, n: int) -> int:
    """Freeze the stem and the first ``n`` stages; returns the number of frozen parameters."""
    if n <= 0:
        return 0
    groups = layer_groups(model)
    n_stages = len(groups) - 2  # stem ... head
    if n > n_stages:
        raise ModelError(f"model.freeze_stages={n}, but {type(model).__name__} has {n_stages} stages "
                         f"(freeze at most {n_stages}; the head always trains)")
    names = {name for g in groups[: n + 1] for name in g}
    frozen = 0
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
