"""The images `knetlab predict` reads: files, folders (recursively: every file with an image suffix) and s3://
prefixes, each with the name its outputs get (its path relative to the folder or prefix given, without suffix)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from knetlab.object_store import is_s3
from knetlab.redact import redact

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class PredictError(ValueError):
    """Inputs that cannot be predicted: none found, a missing path, or images that failed (exit code 2)."""


@dataclass(frozen=True)
class ImageInput:
    source: str  # a local path or s3:// URI: what messages name
    name: str  # the outputs' path under --out, without suffix (POSIX separators)


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def list_inputs(inputs: Sequence[str]) -> list[ImageInput]:
    """Every image of the inputs in order (a folder's and a prefix's sorted), names made unique."""
    found: list[ImageInput] = []
    for given in inputs:
        items = list_s3(given) if is_s3(given) else list_local(given)
        if not items:
            raise PredictError(f"{redact(given)}: no images there (suffixes: {', '.join(IMAGE_SUFFIXES)})")
        found.extend(items)
    seen: dict[str, int] = {}
    unique = []
    for item in found:
        count = seen.get(item.name, 0)
        seen[item.name] = count + 1
        unique.append(item if count == 0 else ImageInput(item.source, f"{item.name}_{count + 1}"))
    return unique


def list_local(given: str) -> list[ImageInput]:
    path = Path(given)
    if path.is_file():
        return [ImageInput(str(path), path.stem)]
    if not path.is_dir():
        raise PredictError(f"{given}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name))
    return [ImageInput(str(p), p.relative_to(path).with_suffix("").as_posix()) for p in files]


def list_s3(given: str) -> list[ImageInput]:
    """The object `given` names, or every image object under it as a prefix."""
    from knetlab.object_store import parse_s3_uri
    from knetlab.platform.storage import StorageError

    bucket, key = parse_s3_uri(given)
    client = shared_s3_client()
    prefix = key.rstrip("/")
    try:
        if prefix and is_image_name(prefix):
            client.head_object(Bucket=bucket, Key=prefix)
            return [ImageInput(f"s3://{bucket}/{prefix}", PurePosixPath(prefix).stem)]
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=f"{prefix}/" if prefix else ""):
            keys += [item["Key"] for item in page.get("Contents", []) if is_image_name(item["Key"])]
    except Exception as error:  # botocore's ClientError, EndpointConnectionError, NoCredentialsError ...
        raise StorageError(f"{redact(given)}: cannot list ({' '.join(redact(str(error)).split())[:200]})") from None
    start = len(prefix) + 1 if prefix else 0
    return [ImageInput(f"s3://{bucket}/{k}", str(PurePosixPath(k[start:]).with_suffix(""))) for k in sorted(keys)]


def read_image(item: ImageInput) -> np.ndarray:
    """The image as uint8 (H, W, 3) RGB; any problem raises an error naming it."""
    from knetlab.data.ade20k import decode_image

    if is_s3(item.source):
        from knetlab.object_store import parse_s3_uri

        bucket, key = parse_s3_uri(item.source)
        data = shared_s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        data = Path(item.source).read_bytes()
    return decode_image(data, item.source)


def shared_s3_client():
    """One client per endpoint for all reads (boto3 clients are thread-safe; making one takes a tenth of a second)."""
    from knetlab.object_store import endpoint_url

    return _s3_client_for(endpoint_url())


@functools.cache
def _s3_client_for(endpoint: str | None):
    from knetlab.object_store import s3_client

    return s3_client()
