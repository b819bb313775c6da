"""medsight's CoAtNets, registered in timm's registry so every timm tool builds them by name.

Dai, Liu, Le, Tan, "CoAtNet: Marrying Convolution and Attention for All Data Sizes", NeurIPS 2021.
``coatnet_0`` is the paper's CoAtNet-0 (2-3-5-2 blocks, 96/192/384/768 channels, ~25M parameters);
``coatnet_tiny`` has one block per stage (32/64/128/256 channels, ~1M parameters) for small data sets
and CPUs. Both take a ``layout``: ``CCTT`` (the paper's, MBConv in stages 1-2, relative-attention
Transformer in 3-4) or ``CCCT``.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, checkpoint_filter_fn

from medsight.models.errors import ModelError

__all__ = ["COATNETS", "COAT_LAYOUTS"]

COAT_LAYOUTS = {"CCTT": ("C", "C", "T", "T"), "CCCT": ("C", "C", "C", "T")}

#: medsight's CoAtNet configurations: name -> (depths, channels, stem width, timm name with weights or None).
COATNETS: dict[str, tuple[tuple[int, ...], tuple[int, ...], Any, str | None]] = {
    "coatnet_tiny": ((1, 1, 1, 1), (32, 64, 128, 256), (16, 32), None),
    "coatnet_0": ((2, 3, 5, 2), (96, 192, 384, 768), 64, "coatnet_0_rw_224.sw_in1k"),
    "coatnet_1": ((2, 6, 14, 2), (96, 192, 384, 768), 64, "coatnet_1_rw_224.sw_in1k"),
    "coatnet_2": ((2, 6, 14, 2), (128, 256, 512, 1024), 128, "coatnet_2_rw_224.sw_in12k_ft_in1k"),
}

default_cfgs = generate_default_cfgs({
    f"{name}.untrained": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.95,
        "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.conv1", "classifier": "head.fc", "fixed_input_size": True,
    }
    for name in COATNETS
})


def _build_coatnet(name: str, pretrained: bool = False, layout: str = "CCTT", **kwargs: Any) -> MaxxVit:
    depths, dims, stem, _ = COATNETS[name]
    layout = (layout or "CCTT").upper()
    if layout not in COAT_LAYOUTS:
        raise ModelError(f"layout must be one of {', '.join(COAT_LAYOUTS)}, got {layout!r}")
    cfg = MaxxVitCfg(embed_dim=dims, depths=depths, block_type=COAT_LAYOUTS[layout], stem_width=stem,
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
