"""The seed projects' CNN + Transformer adapter over any timm CNN, registered in timm's registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

__all__ = ["CnnTransformer", "ADAPTER_BACKBONES"]

ADAPTER_BACKBONES = ("resnet18", "resnet50", "densenet121", "efficientnet_b0")
default_cfgs = generate_default_cfgs({  # read by timm's register_model for the adapters below
    f"cnn_transformer_{b}.untrained": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.95, "interpolation": "bicubic",
        "mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD, "classifier": "head",
        "fixed_input_size": True,
    }
    for b in ADAPTER_BACKBONES
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

    # timm's model interface, so stage freezing, progressive fine-tuning and timm's tools reach the adapter
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded tokens (B, N, embed_dim)."""
        fmap = self.proj(self.features(x)[-1])
        b, c, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if h * w != pos.shape[1]:  # another input size: interpolate the positional grid
            pos = torch.nn.functional.interpolate(pos.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2),
                                                  size=(h, w), mode="bilinear", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, h * w, c)
        return self.norm(self.encoder(tokens + pos))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.head.in_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.features.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """Parameter name -> layer group: the CNN's stem and stages (from its ``feature_info``), then the
        projection, Transformer encoder and head as the last group (they start untrained together)."""
        names = [n for n, _ in self.features.named_modules()]
        pos = {n: i for i, n in enumerate(names)}
        ends = []
        for info in self.features.feature_info.info:
            m = info["module"]
            m = m if m in pos else m.replace(".", "_", 1)  # features_only flattens the first level
            ends.append(max(i for n, i in pos.items() if n == m or n.startswith(m + ".")))

        def matcher(param: str) -> tuple[int]:
            if not param.startswith("features."):
                return (len(ends),)
            owner = pos.get(param[len("features."):].rsplit(".", 1)[0], len(names))
            return (next((s for s, e in enumerate(ends) if owner <= e), len(ends) - 1),)
        return matcher


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
