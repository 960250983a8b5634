"""K-Net for semantic, panoptic and instance segmentation: backbones, heads, the segmentor and the detector, losses,
the model zoo (one `create_model` for both families) and checkpoint conversion from the released mmsegmentation and
K-Net (mmdet) weights."""

from knetlab.models.backbones import BACKBONES, build_backbone
from knetlab.models.convert import convert_checkpoint_file, convert_mmseg_state_dict
from knetlab.models.convert_mmdet import convert_mmdet_checkpoint_file, convert_mmdet_state_dict
from knetlab.models.det_zoo import DET_MODELS, DetModelSpec
from knetlab.models.errors import ConversionError, ModelError
from knetlab.models.heads import HEADS
from knetlab.models.knet_detector import KNetDetector
from knetlab.models.panoptic_fusion import reference_panoptic_map
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
    "DET_MODELS",
    "HEADS",
    "MODELS",
    "ConversionError",
    "DetModelSpec",
    "KNetDetector",
    "KNetSegmentor",
    "ModelError",
    "ModelSpec",
    "PretrainedError",
    "build_backbone",
    "build_segmentor",
    "convert_checkpoint_file",
    "convert_mmdet_checkpoint_file",
    "convert_mmdet_state_dict",
    "convert_mmseg_state_dict",
    "count_parameters",
    "create_model",
    "list_models",
    "load_backbone_weights",
    "models_table",
    "reference_panoptic_map",
]
