"""Backbones: timm's registry, plus medsight's CoAtNets, the CNN + Transformer adapter, and what timm lacks
(Grad-CAM target layers, layer groups for freezing). A new backbone family's CAM layer goes in targets.py."""

from medsight.models.cnn_transformer import CnnTransformer
from medsight.models.coatnet import COATNETS
from medsight.models.errors import ModelError
from medsight.models.factory import (count_parameters, create_model, data_config, list_models, load_weights,
                                     prepare_compile)
from medsight.models.heads import EmbeddingTap, install_head, set_prototypes
from medsight.models.manifold_mixup import ManifoldMixup
from medsight.models.registry import BACKBONES, MEDSIGHT_MODELS, Backbone
from medsight.models.targets import MIN_CAM_SIDE, CamTarget, cam_target, cell_offset, freeze_stages, layer_groups

__all__ = ["ModelError", "create_model", "layer_groups", "freeze_stages", "data_config", "CamTarget", "cam_target",
           "cell_offset", "MIN_CAM_SIDE",
           "count_parameters", "list_models", "MEDSIGHT_MODELS", "BACKBONES", "Backbone", "load_weights",
           "prepare_compile", "CnnTransformer", "COATNETS", "install_head", "EmbeddingTap", "set_prototypes",
           "ManifoldMixup"]
