"""K-Net for semantic segmentation: backbones, heads, the segmentor, losses, the model zoo and checkpoint conversion
from the released mmsegmentation weights."""

from knetlab.models.backbones import BACKBONES, build_backbone
from knetlab.models.convert import convert_checkpoint_file, convert_mmseg_state_dict
from knetlab.models.errors import ConversionError, ModelError
from knetlab.models.heads import HEADS
from knetlab.models.pretrained import PretrainedError, load_backbone_weights
from knetlab.models.segmentor import KNetSegmentor
from knetlab.models.zoo import (
    MODELS,
    ModelSpec,
    build_segmentor,
    count_parameters,
    create_model,
    list_models,
    models_table,
)

__all__ = [
    "BACKBONES",
    "HEADS",
    "MODELS",
    "ConversionError",
    "KNetSegmentor",
    "ModelError",
    "ModelSpec",
    "PretrainedError",
    "build_backbone",
    "build_segmentor",
    "convert_checkpoint_file",
    "convert_mmseg_state_dict",
    "count_parameters",
    "create_model",
    "list_models",
    "load_backbone_weights",
    "models_table",
]
