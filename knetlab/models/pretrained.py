"""ImageNet-pretrained backbone weights from a local file or an `s3://bucket/key` URI (`knetlab.object_store`), in
mmsegmentation's layout (`open-mmlab://resnet50_v1c`: `stem.*`, `layer*`; mmseg Swin: `patch_embed.projection`,
`stages.*`) or timm's/torchvision's/Microsoft's (`conv1.*`, `layers.*`), converted to the knetlab backbone's keys.
Classifier weights are dropped; anything else that does not fit is an error."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from knetlab.models.backbones import backbone_info
from knetlab.models.errors import ConversionError, ModelError
from knetlab.models.state_dict import (
    convert_mmseg_resnet_state_dict,
    first_line,
    key_problems,
    shape_mismatches,
    unwrap_state_dict,
)
from knetlab.object_store import S3UriError, is_s3, parse_s3_uri, s3_client
from knetlab.redact import redact

log = logging.getLogger(__name__)

# Keys a pretrained file may lack: mmseg's per-stage output norms of Swin start fresh in the reference too
# (docs/knet_reference.md §5), and BN step counters are not weights.
ALLOWED_MISSING = re.compile(r"(^|\.)norm[0-3]\.(weight|bias)$|(^|\.)num_batches_tracked$")
# Keys of an ImageNet classifier that a segmentation backbone has no use for.
CLASSIFIER_KEYS = re.compile(r"^(fc|head|classifier)\.|^norm\.(weight|bias)$")


class PretrainedError(ModelError):
    """A pretrained-weights file or URI that cannot be loaded into the backbone; the message names it."""


@dataclass
class PretrainedReport:
    """What loading a pretrained file did: keys loaded, model keys left at their init, file keys not used."""

    source: str
    layout: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_weights(uri: str) -> dict:
    """torch.load(weights_only=True) of a local path or an s3://bucket/key object."""
    if is_s3(uri):
        try:
            bucket, key = parse_s3_uri(uri)
        except S3UriError as error:
            raise PretrainedError(str(error)) from None
        if not key:
            raise PretrainedError(f"{uri}: an S3 URI must be s3://bucket/key")
        import botocore.exceptions

        buffer = io.BytesIO()
        try:
            s3_client().download_fileobj(bucket, key, buffer)
        except botocore.exceptions.ClientError as error:
            raise PretrainedError(f"{uri}: cannot be downloaded: {redact(error)}") from None
        except botocore.exceptions.BotoCoreError as error:
            raise PretrainedError(f"{uri}: S3 is not reachable: {redact(error)}") from None
        buffer.seek(0)
        source: io.BytesIO | Path = buffer
    else:
        source = Path(uri).expanduser()
        if not source.is_file():
            raise PretrainedError(f"{uri}: pretrained weights file does not exist")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same user error
        raise PretrainedError(
            f"{uri}: cannot be read as a PyTorch checkpoint with weights_only=True: {first_line(error)}"
        ) from None


def convert_pretrained_state_dict(state_dict: Mapping[str, torch.Tensor], backbone: str) -> tuple[dict, str]:
    """(keys of the knetlab backbone `backbone`, name of the layout found) for an ImageNet checkpoint; a full
    segmentation checkpoint (keys `backbone.*`) gives its backbone."""
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    family = backbone_info(backbone).family
    if family == "resnet":
        if any(k.startswith("stem.") for k in state_dict):
            return convert_mmseg_resnet_state_dict(state_dict), "mmseg ResNetV1c"
        return dict(state_dict), "timm/torchvision ResNet"
    from knetlab.models import swin

    if any(k.startswith(("stages.", "patch_embed.projection.")) for k in state_dict):
        return swin.convert_mmseg_swin_state_dict(dict(state_dict)), "mmseg Swin"
    return swin.convert_timm_swin_state_dict(dict(state_dict)), "timm/Microsoft Swin"


def load_backbone_weights(model: nn.Module, uri: str, backbone: str) -> PretrainedReport:
    """Load pretrained weights from `uri` into the backbone module `model` (built as `backbone`). Classifier keys
    are dropped; a model key the file lacks (other than Swin's fresh norm0-3), or a shape mismatch, is an error."""
    try:
        tensors = unwrap_state_dict(read_weights(uri), uri)
    except ConversionError as error:
        raise PretrainedError(str(error)) from None
    converted, layout = convert_pretrained_state_dict(tensors, backbone)
    expected = model.state_dict()
    unexpected = [k for k in converted if k not in expected]
    missing = [k for k in expected if k not in converted]
    if not set(converted) & set(expected):
        raise PretrainedError(
            f"{uri}: no key fits backbone {backbone!r} (read as {layout} layout; file keys start with "
            f"{', '.join(sorted(converted)[:5])}; backbone keys start with {', '.join(list(expected)[:5])})"
        )
    problems = key_problems([k for k in missing if not ALLOWED_MISSING.search(k)], [],
                            shape_mismatches(converted, expected))
    if problems:
        raise PretrainedError(f"{uri} ({layout} layout) does not fit backbone {backbone!r}: {problems}")
    model.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=False)
    report = PretrainedReport(
        source=uri, layout=layout, loaded=len(expected) - len(missing), missing=missing, unexpected=unexpected
    )
    unused = [k for k in unexpected if not CLASSIFIER_KEYS.search(k)]
    log.info("loaded %d tensors of backbone %s from %s (%s layout)", report.loaded, backbone, uri, layout)
    if missing:
        log.info("left at their init (not in %s): %s", uri, ", ".join(missing))
    if unexpected:
        log.info("not used from %s: %s", uri, ", ".join(unexpected))
    if unused:
        log.warning("%s has %d non-classifier keys the backbone does not use: %s", uri, len(unused),
                    ", ".join(unused[:12]))
    return report
