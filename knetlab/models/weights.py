"""Pretrained backbone weights by source: the reference ImageNet files of the table rows (where they are published and
what is known of their checksums), the `model.pretrained` / `model.pretrained_sha256` settings, and fetching an
https:// URL or s3:// object once per node into a local cache (or taking a local file as it is), its sha256 checked.

A cached file is complete only at its final path, which it reaches by an atomic rename after its checksum passed; the
workers of one node serialise on an `fcntl` lock beside it (the first downloads, the others find it there). Its
sha256 is kept beside it (`FILE.sha256`), so a later expected checksum is compared without reading the file again.

Checksums: 64 hex digits, or a prefix of 8 or more. open-mmlab and torchvision publish their files with the first 8
hex digits of the sha256 in the file name (`resnet50_v1c-2cccc1ad.pth`), which `torch.hub` checks the same way; a
file whose publisher gives no checksum has `sha256=None` here, and its digest is reported rather than invented.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from knetlab.file_lock import exclusive_lock
from knetlab.models.errors import PretrainedError
from knetlab.object_store import S3UriError, is_s3, parse_s3_uri, s3_client
from knetlab.redact import redact

log = logging.getLogger(__name__)

FROM_SCRATCH = "none"  # model.pretrained=none: random initialisation, asked for explicitly
DEFAULT_CACHE_DIR = "~/.cache/knetlab/weights"
HTTP_TIMEOUT_S = 60.0  # per connection attempt and per read: a server that stops answering fails, never hangs
SHA256_PATTERN = re.compile(r"[0-9a-f]{8,64}")
REMOTE_SCHEMES = ("https://", "http://", "s3://")


@dataclass(frozen=True)
class ReferenceWeights:
    """The ImageNet weights a released model started from, as its config names them."""

    url: str
    sha256: str | None  # the digits the publisher gives (a prefix of 8+ hex digits) or None: not published
    description: str


# Where the reference configs point (docs/knet_reference.md §5, docs/knet_panoptic_reference.md §2.1; mmcv resolves
# `open-mmlab://resnet50_v1c` and `torchvision://resnet50` to these URLs). The torchvision URLs are ImageNet1K_V1,
# what `torchvision://` meant when the K-Net COCO models were trained (2021; torchvision >= 0.13's DEFAULT is V2).
REFERENCE_WEIGHTS: dict[str, ReferenceWeights] = {
    "open-mmlab/resnet50_v1c": ReferenceWeights(
        "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth", "2cccc1ad",
        "ResNetV1c-50 ImageNet-1k (open-mmlab://resnet50_v1c; mmcv layout `stem.*`, `layer*`)"),
    "mmseg/swin_tiny_patch4_window7_224": ReferenceWeights(
        "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/swin/"
        "swin_tiny_patch4_window7_224_20220308-f41b89d3.pth", "f41b89d3",
        "Swin-T ImageNet-1k, window 7, 224 (mmseg layout `patch_embed.projection`, `stages.*`)"),
    "mmseg/swin_large_patch4_window7_224_22k": ReferenceWeights(
        "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/swin/"
        "swin_large_patch4_window7_224_22k_20220308-d5bdebaf.pth", "d5bdebaf",
        "Swin-L ImageNet-22k, window 7, 224 (mmseg layout `patch_embed.projection`, `stages.*`)"),
    "torchvision/resnet50": ReferenceWeights(
        "https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61",
        "ResNet-50 ImageNet-1k V1 (torchvision://resnet50; torchvision layout `conv1`, `bn1`, `layer*`, `fc`)"),
    "torchvision/resnet101": ReferenceWeights(
        "https://download.pytorch.org/models/resnet101-63fe2227.pth", "63fe2227",
        "ResNet-101 ImageNet-1k V1 (torchvision://resnet101; torchvision layout)"),
    # The K-Net COCO Swin-L config loads Microsoft's release directly; Microsoft publishes no checksum for it.
    "microsoft/swin_large_patch4_window7_224_22k": ReferenceWeights(
        "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_large_patch4_window7_224_22k.pth",
        None, "Swin-L ImageNet-22k, window 7, 224 (Microsoft layout `{'model': ...}`, `layers.*`, 21841-class head)"),
}


@dataclass(frozen=True)
class WeightsSource:
    """What an experiment loads into its backbone: a URL, s3:// URI or local path, its expected sha256 (or None) and
    the reference it is (or None)."""

    uri: str
    sha256: str | None
    reference: str | None = None


@dataclass(frozen=True)
class LocalWeights:
    """A weights file on this node: its path, full sha256 and whether it was checked against an expected one."""

    source: WeightsSource
    path: Path
    sha256: str
    checked: bool


def is_from_scratch(pretrained: str | None) -> bool:
    return isinstance(pretrained, str) and pretrained.strip().lower() == FROM_SCRATCH


def normalise_sha256(value: str | None) -> str | None:
    return value.strip().lower() if isinstance(value, str) else None


def setting_problem(pretrained: str | None, sha256: str | None) -> tuple[str, str] | None:
    """(key, what is wrong) for `model.pretrained` / `model.pretrained_sha256` values that cannot work, else None."""
    if pretrained is not None and not pretrained.strip():
        return "model.pretrained", ("must be null (the model's reference weights), none (random initialisation), an "
                                    "https:// URL, an s3:// URI or a local path, got an empty string")
    if pretrained and "://" in pretrained and not pretrained.startswith(REMOTE_SCHEMES):
        return "model.pretrained", (f"{redact(pretrained)}: unknown scheme (valid: https://, http://, s3:// or a local "
                                    f"path)")
    if sha256 is not None and not SHA256_PATTERN.fullmatch(normalise_sha256(sha256) or ""):
        return "model.pretrained_sha256", (f"must be null (not known) or the file's sha256 in hex: 64 digits or a "
                                           f"prefix of 8 or more, got {sha256!r}")
    return None


def weights_source(pretrained: str | None, sha256: str | None, reference: str | None) -> WeightsSource | None:
    """What `model.pretrained` (null: the model's `reference`, the key of a REFERENCE_WEIGHTS entry or None) and
    `model.pretrained_sha256` load; None when the backbone starts from random weights. The reference's checksum
    applies when model.pretrained is its URL and model.pretrained_sha256 is null."""
    if is_from_scratch(pretrained):
        return None
    known = REFERENCE_WEIGHTS.get(reference) if reference else None
    if pretrained is None:
        if known is None:
            return None
        return WeightsSource(known.url, normalise_sha256(sha256) or known.sha256, reference)
    if known is not None and pretrained == known.url:
        return WeightsSource(pretrained, normalise_sha256(sha256) or known.sha256, reference)
    return WeightsSource(pretrained, normalise_sha256(sha256))


def how_to_supply(uri: str) -> str:
    """The one-line hint of an error about weights that cannot be used: where a copy can come from instead."""
    name = PurePosixPath(urllib.parse.urlparse(uri).path).name or "WEIGHTS.pth"
    return (f"download it where you can and pass model.pretrained=/path/to/{name} (a local copy) or "
            f"model.pretrained=s3://BUCKET/PREFIX/{name} (an S3 mirror; the sha256 is checked either way), "
            f"or model.pretrained=none to train the backbone from scratch")


def s3_object(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3://bucket/key weights file; a PretrainedError for anything else."""
    try:
        bucket, key = parse_s3_uri(uri)
    except S3UriError as error:
        raise PretrainedError(str(error)) from None
    if not key:
        raise PretrainedError(f"{uri}: an S3 URI must be s3://bucket/key")
    return bucket, key


def cache_path(uri: str, cache_dir: str | os.PathLike) -> Path:
    """CACHE_DIR/https/HOST/PATH for a URL (query dropped), CACHE_DIR/s3/BUCKET/KEY for an S3 object."""
    if is_s3(uri):
        bucket, key = s3_object(uri)
        parts = ["s3", bucket, *PurePosixPath(key).parts]
    else:
        parsed = urllib.parse.urlparse(uri)
        parts = [parsed.scheme, parsed.netloc.replace(":", "_"), *PurePosixPath(parsed.path).parts[1:]]
        if not parsed.netloc or len(parts) < 3:
            raise PretrainedError(f"{redact(uri)}: a weights URL must name a file (https://HOST/PATH/FILE)")
    if any(part in ("", ".", "..") for part in parts):
        raise PretrainedError(f"{redact(uri)}: '.' or '..' is not allowed in a weights URI")
    return Path(cache_dir).expanduser().joinpath(*parts)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def mismatch_message(source: WeightsSource, digest: str) -> str:
    return (f"model.pretrained={redact(source.uri)}: its sha256 {digest} does not match model.pretrained_sha256="
            f"{source.sha256} (a damaged or different file, not kept in the cache); if it is another file on purpose, "
            f"set model.pretrained_sha256={digest} (or null to skip the check)")


def fetch_weights(source: WeightsSource, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> LocalWeights:
    """The weights of `source` as a file on this node: a local path as it is, a URL or S3 object from the node's
    cache, downloaded first if it is not there; the sha256 checked when `source.sha256` is known. Every failure is a
    PretrainedError in one line that names the weights and says how to supply a copy."""
    if not source.uri.startswith(REMOTE_SCHEMES):
        path = Path(source.uri).expanduser()
        if not path.is_file():
            raise PretrainedError(f"model.pretrained={source.uri}: pretrained weights file does not exist; "
                                  f"{how_to_supply(source.uri)}")
        digest = file_sha256(path)
        if source.sha256 and not digest.startswith(source.sha256):
            raise PretrainedError(mismatch_message(source, digest).replace(", not kept in the cache", ""))
        return LocalWeights(source, path, digest, checked=bool(source.sha256))
    target = cache_path(source.uri, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        digest = cached_digest(target)
        if digest is not None and (not source.sha256 or digest.startswith(source.sha256)):
            return LocalWeights(source, target, digest, checked=bool(source.sha256))
        target.unlink(missing_ok=True)  # absent, or a copy of another file than the one expected now
        handle, temp_name = tempfile.mkstemp(prefix=target.name + ".partial-", dir=target.parent)
        os.close(handle)
        temp = Path(temp_name)
        try:
            print(f"knetlab: fetching {redact(source.uri)} into {target.parent}", file=sys.stderr, flush=True)
            download(source.uri, temp)
            digest = file_sha256(temp)
            if source.sha256 and not digest.startswith(source.sha256):
                raise PretrainedError(mismatch_message(source, digest))
            Path(str(target) + ".sha256").write_text(digest + "\n")
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    if not source.sha256:
        log.warning("no sha256 known for %s: its sha256 is %s (set model.pretrained_sha256 to check it)",
                    redact(source.uri), digest)
    return LocalWeights(source, target, digest, checked=bool(source.sha256))


def cached_digest(target: Path) -> str | None:
    """The sha256 of a complete cached file (from its `.sha256` file, else computed), None when there is none."""
    if not target.is_file():
        return None
    recorded = Path(str(target) + ".sha256")
    text = recorded.read_text().strip() if recorded.is_file() else ""
    return text if SHA256_PATTERN.fullmatch(text) and len(text) == 64 else file_sha256(target)


def download(uri: str, dest: Path) -> None:
    """Copy the object at `uri` (https://, http:// or s3://) to the file `dest`."""
    unreachable = f"model.pretrained={redact(uri)}: cannot be fetched"
    if is_s3(uri):
        import botocore.exceptions

        bucket, key = parse_s3_uri(uri)
        try:
            s3_client().download_file(bucket, key, str(dest))
        except botocore.exceptions.ClientError as error:
            raise PretrainedError(f"{unreachable} ({redact(error)}); {how_to_supply(uri)}") from None
        except botocore.exceptions.BotoCoreError as error:
            raise PretrainedError(f"{unreachable} (S3 is not reachable: {redact(error)}); {how_to_supply(uri)}"
                                  ) from None
        return
    request = urllib.request.Request(uri, headers={"User-Agent": "knetlab"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response, open(dest, "wb") as out:
            copy_with_progress(response, out, int(response.headers.get("Content-Length") or 0), uri)
    except urllib.error.HTTPError as error:
        raise PretrainedError(f"{unreachable} (HTTP {error.code} {error.reason}); {how_to_supply(uri)}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise PretrainedError(f"{unreachable} ({type(reason).__name__}: {redact(str(reason))}); "
                              f"{how_to_supply(uri)}") from None


def copy_with_progress(response: Any, out: Any, total: int, uri: str, interval_s: float = 10.0) -> None:
    done, last, start = 0, time.monotonic(), time.monotonic()
    while chunk := response.read(1 << 20):
        out.write(chunk)
        done += len(chunk)
        if time.monotonic() - last >= interval_s:
            last = time.monotonic()
            rate = done / max(last - start, 1e-9) / 1e6
            of_total = f"/{total / 1e6:.0f}" if total else ""
            print(f"knetlab: fetching {redact(uri)}: {done / 1e6:.0f}{of_total} MB ({rate:.1f} MB/s)",
                  file=sys.stderr, flush=True)
