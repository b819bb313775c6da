"""What timm lacks: the layer Grad-CAM reads per architecture family, and layer groups for freezing."""

from __future__ import annotations

import difflib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from medsight.models.errors import ModelError

__all__ = ["CamTarget", "cam_target", "layer_groups", "freeze_stages", "MIN_CAM_SIDE", "cell_offset"]

#: The default Grad-CAM layer is the deepest stage whose map has at least this many cells on a side: the
#: 7 × 7 grid of an ImageNet CNN's last stage at 224 px, on which Grad-CAM was shown to localize. A coarser
#: grid cannot place a small finding: at 64 px, CoAtNet's last stages are 2 × 2 and 4 × 4.
MIN_CAM_SIDE = 7


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
    deepest stage (per timm's ``feature_info``) whose map is at least ``min_side`` cells on a side."""
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
               min_side: int = MIN_CAM_SIDE) -> CamTarget:
    """The Grad-CAM target of ``model``: ``name`` (a dotted module path) or the family's last stage
    (or, where that stage's map at ``img_size`` is under ``min_side`` cells on a side, the deepest stage
    that is not; the shallowest stage if none is)."""
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


_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _geometry(m: nn.Module, hw: tuple[int, int]) -> tuple[list[int], tuple[int, int], list[int]] | None:
    """Per axis: kernel extent, stride and padding before the first pixel of a strided convolution or pool
    on an ``hw`` input; None for anything else."""
    if not isinstance(m, _SPATIAL):
        return None
    stride = _pair(m.stride or m.kernel_size)
    if max(stride) < 2:
        return None
    ext = [d * (k - 1) + 1 for k, d in zip(_pair(m.kernel_size), _pair(getattr(m, "dilation", 1)))]
    if type(m).__name__.endswith("Same"):  # timm's TensorFlow padding: an odd padding pixel goes after
        pad = [max((math.ceil(n / s) - 1) * s + e - n, 0) // 2 for n, s, e in zip(hw, stride, ext)]
    elif isinstance(m.padding, str):
        pad = [0, 0] if m.padding == "valid" else [(e - 1) // 2 for e in ext]
    else:
        pad = list(_pair(m.padding))
    return ext, stride, pad


#: model -> layer -> input (H, W) -> offset. The offset is the architecture's geometry, not the weights' or the
#: images', so it is measured once per layer and input size instead of a forward pass on every explain call.
_OFFSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cell_offset(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Where ``layer``'s cells are centred on the input ``x``, less where a map resized to the input puts
    them: (dy, dx) in input pixels (measured by :func:`_measure_offset`, once per layer and input size)."""
    per_size = _OFFSETS.setdefault(model, weakref.WeakKeyDictionary()).setdefault(layer, {})
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if size not in per_size:
        per_size[size] = _measure_offset(model, layer, x)
    return per_size[size]


def _measure_offset(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """:func:`cell_offset` from one forward pass that records each strided convolution and pool before ``layer``.

    Resizing an n-cell map to the input centres cell i at (i + ½)·s (s: the layer's stride). A strided
    convolution or pool with kernel extent k and padding p centres its output i at s·i − p + (k − 1)/2 + ½
    of its input instead: half a pixel earlier for the common 3 × 3, stride 2, padding 1 (3.5 px after three
    of them: ½·1 + ½·2 + ½·4), not at all for a 2 × 2 pool or a non-overlapping patch embedding. The
    shifts of the strided convolutions and pools that run before ``layer`` is done are summed, each in
    input pixels; where parallel branches reduce the same resolution (a residual block's pooled shortcut
    beside its convolution), the branch with the widest kernel, the block's learned path, counts.
    """
    records: list[tuple[tuple[int, int], tuple[list[int], tuple[int, int], list[int]]]] = []
    done: list[bool] = []

    def before(m: nn.Module, args: tuple) -> None:
        if not done and args and torch.is_tensor(args[0]) and args[0].dim() == 4:
            hw = (int(args[0].shape[-2]), int(args[0].shape[-1]))
            g = _geometry(m, hw)
            if g is not None:
                records.append((hw, g))

    handles = [m.register_forward_pre_hook(before) for m in model.modules() if isinstance(m, _SPATIAL)]
    handles.append(layer.register_forward_hook(lambda *_: done.append(True)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    levels: dict[tuple[int, int], tuple[list[int], tuple[int, int], list[int]]] = {}
    for hw, g in records:
        if hw not in levels or max(g[0]) > max(levels[hw][0]):
            levels[hw] = g
    size = x.shape[-2:]
    shift = [0.0, 0.0]
    for hw, (ext, stride, pad) in levels.items():
        for a in (0, 1):
            shift[a] += (-pad[a] + (ext[a] - 1) / 2 + 0.5 - stride[a] / 2) * size[a] / hw[a]
    return shift[0], shift[1]


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
