"""medsight's recommended backbones: one table that ``medsight models``, the docs and the tests read.

Any timm name works; these are the ones the seed projects use, with what each is for. Every entry is
built by timm (medsight's CoAtNets and CNN + Transformer adapters are registered in timm's registry).
"""

from __future__ import annotations

from dataclasses import dataclass

from medsight.models.cnn_transformer import ADAPTER_BACKBONES
from medsight.models.coatnet import COATNETS

__all__ = ["Backbone", "BACKBONES", "MEDSIGHT_MODELS"]


@dataclass(frozen=True)
class Backbone:
    name: str
    family: str
    purpose: str
    image_size: int = 224  # the size the tests build it at (Swin V2's windows want 256)


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("coatnet_tiny", "CoAtNet", "medsight's default: one block per stage, for small data sets and CPUs", 64),
    Backbone("coatnet_0", "CoAtNet", "the paper's CoAtNet-0 (25M): convolution + attention as data grows"),
    Backbone("coatnet_1", "CoAtNet", "CoAtNet-1 (42M): large data sets on a GPU"),
    Backbone("coatnet_2", "CoAtNet", "CoAtNet-2 (74M): the largest, for 100k+ images"),
    Backbone("convnext_tiny", "ConvNeXt", "modern CNN (28M), strong from scratch and fine-tuned"),
    Backbone("swinv2_tiny_window8_256", "Swin V2", "hierarchical vision Transformer (28M), 256 px", 256),
    Backbone("densenet121", "DenseNet", "CheXNet's backbone (8M), the chest X-ray classic"),
    Backbone("efficientnet_b2", "EfficientNet", "efficient CNN (9M), fundus and dermatology favourite"),
    Backbone("resnet18", "ResNet", "the MedMNIST reference (11M), a CNN for a few thousand images"),
    Backbone("resnet50", "ResNet", "the standard transfer-learning baseline (25M)"),
    Backbone("seresnext50_32x4d", "SE-ResNeXt", "squeeze-and-excitation ResNeXt (28M), retinopathy ensembles"),
    *(Backbone(f"cnn_transformer_{b}", "CNN + Transformer", f"{b} feature map -> 2-layer Transformer encoder")
      for b in ADAPTER_BACKBONES),
)}

#: The models medsight itself adds to timm's registry.
MEDSIGHT_MODELS = tuple(COATNETS) + tuple(f"cnn_transformer_{b}" for b in ADAPTER_BACKBONES)
