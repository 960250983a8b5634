"""ImageNet-pretrained backbone weights from a local file, an `s3://bucket/key` URI (`knetlab.object_store`) or an
https:// URL (`weights.py`'s node cache), in mmsegmentation's layout (`open-mmlab://resnet50_v1c`: `stem.*`, `layer*`;
mmseg Swin: `patch_embed.projection`, `stages.*`) or timm's/torchvision's/Microsoft's (`conv1.*`, `layers.*`),
converted to the knetlab backbone's keys. Classifier weights are dropped; a backbone key the file lacks (other than
those that start fresh in the reference too) or a shape that differs is an error. The same check runs on a backbone
built on the meta device (`load=False`), which is how the driver tells what loading will do before any worker starts.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from knetlab.models.errors import ConversionError, PretrainedError
from knetlab.models.state_dict import (
    convert_mmseg_resnet_state_dict,
    first_line,
    key_problems,
    shape_mismatches,
    unwrap_state_dict,
)
from knetlab.object_store import is_s3, s3_client
from knetlab.redact import redact

__all__ = ["PretrainedError", "PretrainedReport", "fit_backbone_weights", "load_backbone_weights", "read_weights"]

log = logging.getLogger(__name__)

# Keys a pretrained file may lack: mmseg's per-stage output norms of Swin start fresh in the reference too
# (docs/knet_reference.md §5), the deformable convs' offsets start at 0 as in the reference (mmcv's init), and BN step
# counters are not weights.
ALLOWED_MISSING = re.compile(
    r"(^|\.)norm[0-3]\.(weight|bias)$|(^|\.)num_batches_tracked$|\.conv_offset\.(weight|bias)$")
# Keys of an ImageNet classifier that a segmentation backbone has no use for.
CLASSIFIER_KEYS = re.compile(r"^(fc|head|classifier)\.|^norm\.(weight|bias)$")
KEYS_NAMED = 4  # keys named in a report's one line


@dataclass
class PretrainedReport:
    """What loading a pretrained file does: keys loaded, model keys left at their init, file keys not used."""

    source: str
    layout: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: '330 tensors loaded (mmseg ResNetV1c layout), 0 missing, 2 unused (fc.weight, fc.bias)'."""
        def named(keys: list[str]) -> str:
            more = f", ... {len(keys) - KEYS_NAMED} more" if len(keys) > KEYS_NAMED else ""
            return f" ({', '.join(keys[:KEYS_NAMED])}{more})" if keys else ""

        return (f"{self.loaded} tensors loaded ({self.layout} layout), {len(self.missing)} missing"
                f"{named(self.missing)}, {len(self.unexpected)} unused{named(self.unexpected)}")


def read_weights(uri: str) -> dict:
    """torch.load(weights_only=True) of a local path, an s3://bucket/key object or an https:// URL (fetched into the
    default node cache); a local file is memory-mapped where its format allows."""
    if uri.startswith(("https://", "http://")):
        from knetlab.models.weights import WeightsSource, fetch_weights

        uri = str(fetch_weights(WeightsSource(uri, None)).path)
    if is_s3(uri):
        from knetlab.models.weights import s3_object

        bucket, key = s3_object(uri)
        import botocore.exceptions

        buffer = io.BytesIO()
        try:
            s3_client().download_fileobj(bucket, key, buffer)
        except botocore.exceptions.ClientError as error:
            raise PretrainedError(f"{uri}: cannot be downloaded: {redact(error)}") from None
        except botocore.exceptions.BotoCoreError as error:
            raise PretrainedError(f"{uri}: S3 is not reachable: {redact(error)}") from None
        buffer.seek(0)
        return _load(buffer, uri)
    path = Path(uri).expanduser()
    if not path.is_file():
        raise PretrainedError(f"{uri}: pretrained weights file does not exist")
    try:  # a large file (Swin-L: 0.8 GB) is mapped, not read, unless it is in the legacy (pre-zip) format
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the legacy format, or not a checkpoint at all: read it plainly for the real error
        return _load(path, uri)


def _load(source: io.BytesIO | Path, uri: str) -> dict:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same user error
        raise PretrainedError(
            f"{uri}: cannot be read as a PyTorch checkpoint with weights_only=True: {first_line(error)}"
        ) from None


def convert_pretrained_state_dict(state_dict: Mapping[str, torch.Tensor], family: str) -> tuple[dict, str]:
    """(keys of a knetlab backbone of `family` ("resnet" | "swin"), name of the layout found) for an ImageNet
    checkpoint; a full segmentation checkpoint (keys `backbone.*`) gives its backbone."""
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if family == "resnet":
        if any(k.startswith("stem.") for k in state_dict):
            return convert_mmseg_resnet_state_dict(state_dict), "mmseg ResNetV1c"
        return dict(state_dict), "timm/torchvision ResNet"
    from knetlab.models import swin

    if any(k.startswith(("stages.", "patch_embed.projection.")) for k in state_dict):
        return swin.convert_mmseg_swin_state_dict(dict(state_dict)), "mmseg Swin"
    return swin.convert_timm_swin_state_dict(dict(state_dict)), "timm/Microsoft Swin"


def fit_backbone_weights(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], family: str,
                         source: str, backbone: str) -> tuple[dict[str, torch.Tensor], PretrainedReport]:
    """The tensors of a pretrained file converted onto the backbone whose state dict is `expected` (shapes are all
    that is read: meta tensors do), and the report of what loading them does. A PretrainedError names the keys when
    they do not fit."""
    converted, layout = convert_pretrained_state_dict(tensors, family)
    unexpected = [k for k in converted if k not in expected]
    missing = [k for k in expected if k not in converted]
    if not set(converted) & set(expected):
        raise PretrainedError(
            f"{source}: no key fits backbone {backbone!r} (read as {layout} layout; file keys start with "
            f"{', '.join(sorted(converted)[:5])}; backbone keys start with {', '.join(list(expected)[:5])})"
        )
    problems = key_problems([k for k in missing if not ALLOWED_MISSING.search(k)], [],
                            shape_mismatches(converted, expected))
    if problems:
        raise PretrainedError(f"{source} ({layout} layout) does not fit backbone {backbone!r}: {problems}")
    report = PretrainedReport(source=source, layout=layout, loaded=len(expected) - len(missing), missing=missing,
                              unexpected=unexpected)
    return {k: v for k, v in converted.items() if k in expected}, report


def load_backbone_weights(model: nn.Module, uri: str, backbone: str, *, family: str | None = None,
                          load: bool = True) -> PretrainedReport:
    """Load pretrained weights from `uri` into the backbone module `model` (built as `backbone`, of `family`: by
    default the semantic backbone registry's); with `load=False` only check that they fit (`model` may live on the
    meta device). Classifier keys are dropped; a model key the file lacks (other than ALLOWED_MISSING), or a shape
    mismatch, is an error."""
    if family is None:
        from knetlab.models.backbones import backbone_info

        family = backbone_info(backbone).family
    try:
        tensors = unwrap_state_dict(read_weights(uri), uri)
    except ConversionError as error:
        raise PretrainedError(str(error)) from None
    to_load, report = fit_backbone_weights(tensors, model.state_dict(), family, redact(uri), backbone)
    if not load:
        return report
    model.load_state_dict(to_load, strict=False)
    unused = [k for k in report.unexpected if not CLASSIFIER_KEYS.search(k)]
    log.info("loaded %d tensors of backbone %s from %s (%s layout)", report.loaded, backbone, redact(uri),
             report.layout)
    if report.missing:
        log.info("left at their init (not in %s): %s", redact(uri), ", ".join(report.missing))
    if report.unexpected:
        log.info("not used from %s: %s", redact(uri), ", ".join(report.unexpected))
    if unused:
        log.warning("%s has %d non-classifier keys the backbone does not use: %s", redact(uri), len(unused),
                    ", ".join(unused[:12]))
    return report
