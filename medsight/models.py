"""Backbones: every model comes from timm's registry; medsight adds its CoAtNet configs to that registry.

Dai, Liu, Le, Tan, "CoAtNet: Marrying Convolution and Attention for All Data Sizes", NeurIPS 2021.
``coatnet_0`` is the paper's CoAtNet-0 (2-3-5-2 blocks, 96/192/384/768 channels, ~25M parameters);
``coatnet_tiny`` has one block per stage (32/64/128/256 channels, ~1M parameters) for small data sets
and CPUs. Both take a ``layout``:
``CCTT`` (the paper's, MBConv in stages 1-2, relative-attention Transformer in 3-4) or ``CCCT``.

Beyond timm, this module keeps only what timm lacks: which layer Grad-CAM should look at, and how to
turn token outputs back into a feature map, for each architecture family.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, checkpoint_filter_fn
from torch import nn

__all__ = ["ModelError", "create_model", "layer_groups", "freeze_stages", "data_config", "CamTarget", "cam_target", "count_parameters",
           "list_models", "MEDSIGHT_MODELS", "load_weights", "prepare_compile"]

log = logging.getLogger("medsight")


class ModelError(ValueError):
    """A model that cannot be built: unknown name, weights that do not fit, no network for --pretrained."""


_COAT_LAYOUTS = {"CCTT": ("C", "C", "T", "T"), "CCCT": ("C", "C", "C", "T")}

#: medsight's CoAtNet configurations: name -> (depths, channels, stem width, timm name with weights or None).
_COATNETS: dict[str, tuple[tuple[int, ...], tuple[int, ...], Any, str | None]] = {
    "coatnet_tiny": ((1, 1, 1, 1), (32, 64, 128, 256), (16, 32), None),
    "coatnet_0": ((2, 3, 5, 2), (96, 192, 384, 768), 64, "coatnet_0_rw_224.sw_in1k"),
    "coatnet_1": ((2, 6, 14, 2), (96, 192, 384, 768), 64, "coatnet_1_rw_224.sw_in1k"),
    "coatnet_2": ((2, 6, 14, 2), (128, 256, 512, 1024), 128, "coatnet_2_rw_224.sw_in12k_ft_in1k"),
}
MEDSIGHT_MODELS = tuple(_COATNETS)

default_cfgs = generate_default_cfgs({
    f"{name}.untrained": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.95,
        "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.conv1", "classifier": "head.fc", "fixed_input_size": True,
    }
    for name in _COATNETS
})


def _build_coatnet(name: str, pretrained: bool = False, layout: str = "CCTT", **kwargs: Any) -> MaxxVit:
    depths, dims, stem, _ = _COATNETS[name]
    layout = (layout or "CCTT").upper()
    if layout not in _COAT_LAYOUTS:
        raise ModelError(f"layout must be one of {', '.join(_COAT_LAYOUTS)}, got {layout!r}")
    cfg = MaxxVitCfg(embed_dim=dims, depths=depths, block_type=_COAT_LAYOUTS[layout], stem_width=stem,
                     head_hidden_size=dims[-1] if name != "coatnet_tiny" else None)
    return build_model_with_cfg(MaxxVit, name, pretrained, model_cfg=cfg,
                                feature_cfg=dict(flatten_sequential=True),
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def coatnet_tiny(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """One block per stage (1-1-1-1), 32-64-128-256 channels: CoAtNet for small data and CPUs."""
    return _build_coatnet("coatnet_tiny", pretrained, **kwargs)


@register_model
def coatnet_0(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """The paper's CoAtNet-0: 2-3-5-2 blocks, 96-192-384-768 channels."""
    return _build_coatnet("coatnet_0", pretrained, **kwargs)


@register_model
def coatnet_1(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """The paper's CoAtNet-1: 2-6-14-2 blocks, 96-192-384-768 channels."""
    return _build_coatnet("coatnet_1", pretrained, **kwargs)


@register_model
def coatnet_2(pretrained: bool = False, **kwargs: Any) -> MaxxVit:
    """The paper's CoAtNet-2: 2-6-14-2 blocks, 128-256-512-1024 channels."""
    return _build_coatnet("coatnet_2", pretrained, **kwargs)


_ADAPTER_BACKBONES = ("resnet18", "resnet50", "densenet121", "efficientnet_b0")
default_cfgs = generate_default_cfgs({  # read by timm's register_model for the adapters below
    f"cnn_transformer_{b}.untrained": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.95, "interpolation": "bicubic",
        "mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD, "classifier": "head",
        "fixed_input_size": True,
    }
    for b in _ADAPTER_BACKBONES
})


class CnnTransformer(nn.Module):
    """The seed projects' CNN + Transformer adapter: a timm CNN's last feature map, projected and flattened
    to tokens, a learned positional embedding, a Transformer encoder, mean-pooled, then a linear head.

    Written here because timm has hybrid ViTs with a CNN stem but not this adapter over any CNN.
    """

    def __init__(self, backbone: str, num_classes: int = 1000, img_size: int = 224, embed_dim: int = 256,
                 depth: int = 2, num_heads: int = 4, pretrained: bool = False, drop_rate: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__()
        self.features = timm.create_model(backbone, pretrained=pretrained, features_only=True, out_indices=[-1])
        info = self.features.feature_info
        channels, reduction = info.channels()[-1], info.reduction()[-1]
        self.grid = max(1, img_size // reduction)
        self.proj = nn.Conv2d(channels, embed_dim, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, 4 * embed_dim, dropout=drop_rate,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.num_classes = num_classes
        self.head = nn.Linear(embed_dim, num_classes)
        cfg = dict(self.features.pretrained_cfg)
        cfg.update(input_size=(3, img_size, img_size), classifier="head")
        self.pretrained_cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.proj(self.features(x)[-1])
        b, c, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if h * w != pos.shape[1]:  # another input size: interpolate the positional grid
            pos = torch.nn.functional.interpolate(pos.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2),
                                                  size=(h, w), mode="bilinear", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, h * w, c)
        return self.head(self.norm(self.encoder(tokens + pos)).mean(1))


def _cnn_transformer(backbone: str, pretrained: bool, **kwargs: Any) -> CnnTransformer:
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("drop_path_rate", None)
    return CnnTransformer(backbone, pretrained=pretrained, **kwargs)


@register_model
def cnn_transformer_resnet18(pretrained: bool = False, **kwargs: Any) -> CnnTransformer:
    """ResNet-18 feature map -> 2-layer Transformer encoder -> mean-pool head."""
    return _cnn_transformer("resnet18", pretrained, **kwargs)


@register_model
def cnn_transformer_resnet50(pretrained: bool = False, **kwargs: Any) -> CnnTransformer:
    """ResNet-50 feature map -> 2-layer Transformer encoder -> mean-pool head."""
    return _cnn_transformer("resnet50", pretrained, **kwargs)


@register_model
def cnn_transformer_densenet121(pretrained: bool = False, **kwargs: Any) -> CnnTransformer:
    """DenseNet-121 feature map -> 2-layer Transformer encoder -> mean-pool head."""
    return _cnn_transformer("densenet121", pretrained, **kwargs)


@register_model
def cnn_transformer_efficientnet_b0(pretrained: bool = False, **kwargs: Any) -> CnnTransformer:
    """EfficientNet-B0 feature map -> 2-layer Transformer encoder -> mean-pool head."""
    return _cnn_transformer("efficientnet_b0", pretrained, **kwargs)


MEDSIGHT_MODELS = MEDSIGHT_MODELS + tuple(f"cnn_transformer_{b}" for b in _ADAPTER_BACKBONES)


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
    if fixed or name in _COATNETS or name.startswith("cnn_transformer_"):
        kwargs["img_size"] = img_size
    if name in _COATNETS:
        kwargs["layout"] = layout or "CCTT"
    elif layout:
        raise ModelError(f"model.layout applies to medsight's CoAtNets ({', '.join(_COATNETS)}), not {name}")
    if pretrained and weights:
        raise ModelError("give either --pretrained (download timm's weights) or --weights PATH, not both")
    if pretrained and name in _COATNETS:
        source = _COATNETS[name][3]
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


# ------------------------------------------------------------------------- what timm lacks: CAM layers

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
