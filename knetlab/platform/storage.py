"""Checkpoint storage: `storage.uri` (a local path or `s3://bucket/prefix`) as Ray Train's storage, the up-front
checks that it can be used, and copies from it. S3 itself (URIs, endpoint, client, the retrying pyarrow filesystem)
is `knetlab.object_store`; credentials never appear in a message (`knetlab.redact`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.fs as pafs

from knetlab.object_store import S3UriError, endpoint_url, is_s3, parse_s3_uri, s3_client, s3_filesystem
from knetlab.redact import REDACTED, redact

__all__ = [
    "REDACTED",
    "StorageError",
    "check_storage",
    "cluster_node_count",
    "download_dir",
    "is_s3",
    "join_uri",
    "local_path",
    "redact",
    "require_shared_storage",
    "storage_target",
]

MARKER_PREFIX = ".knetlab-write-test-"


class StorageError(RuntimeError):
    """Storage that cannot be used (a run-time failure: exit code 1); one line naming the URI, never credentials."""


# -- URIs -------------------------------------------------------------------------------------------------------------
def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix/` -> ("bucket", "prefix"), as a StorageError when it names no bucket."""
    try:
        return parse_s3_uri(uri)
    except S3UriError as error:
        raise StorageError(str(error)) from None


def local_path(uri: str) -> Path:
    """The absolute local path of a local `uri` (a path or file://); other schemes are refused."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(f"{redact(uri)}: unsupported storage scheme {uri.split('://')[0]!r} "
                           "(valid: a local path or s3://bucket/prefix)")
    return Path(uri).expanduser().resolve()


def join_uri(uri: str, *parts: str) -> str:
    """`join_uri("s3://b/ckpt/", "run", "/checkpoint_1")` -> "s3://b/ckpt/run/checkpoint_1"."""
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])


def storage_target(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for `RunConfig(storage_filesystem=..., storage_path=...)`: (None, absolute path) for a
    local folder, (S3 filesystem, "bucket/prefix") for s3://bucket/prefix."""
    if is_s3(uri):
        bucket, prefix = split_s3_uri(uri)
        return s3_filesystem(), f"{bucket}/{prefix}".rstrip("/")
    return None, str(local_path(uri))


def _filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    filesystem, path = storage_target(uri)
    return filesystem or pafs.LocalFileSystem(), path


# -- checks before any worker starts ----------------------------------------------------------------------------------
def check_storage(uri: str) -> None:
    """The bucket answers and accepts a write and a delete with the current credentials (a marker object written and
    deleted), or the local directory can be created and written. Raises StorageError, one line naming the URI."""
    if not is_s3(uri):
        path = local_path(uri)
        try:
            path.mkdir(parents=True, exist_ok=True)
            marker = path / f"{MARKER_PREFIX}{uuid.uuid4().hex}"
            marker.write_text("ok")
            marker.unlink()
        except OSError as error:
            raise StorageError(f"storage.uri={redact(uri)}: cannot write to {path} ({error.strerror or error})"
                               ) from None
        return
    import botocore.exceptions

    bucket, prefix = split_s3_uri(uri)
    endpoint = endpoint_url()
    where = f" at {redact(endpoint)}" if endpoint else ""
    name = f"storage.uri={redact(uri)}"
    client = s3_client(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 2})
    key = f"{prefix}/{MARKER_PREFIX}{uuid.uuid4().hex}".lstrip("/")
    stage = "write to"
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"ok")
        stage = "delete from"
        client.delete_object(Bucket=bucket, Key=key)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(f"{name}: no AWS credentials found (environment, profile or IAM role)") from None
    except botocore.exceptions.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "?"))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") or status == 404:
            raise StorageError(f"{name}: bucket {bucket!r} does not exist{where}") from None
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                    "InvalidToken", "403") or status == 403:
            raise StorageError(f"{name}: access denied ({code}) to {stage} bucket {bucket!r}{where}: "
                               "check the AWS credentials (environment, profile or IAM role) and their permissions"
                               ) from None
        raise StorageError(f"{name}: S3 error {code} (HTTP {status}) on bucket {bucket!r}{where}") from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError) as error:
        reason = _UNREACHABLE_REASONS.get(type(error).__name__, type(error).__name__)
        raise StorageError(f"{name}: bucket {bucket!r} not reachable{where or ' (AWS S3)'} ({reason})") from None
    except botocore.exceptions.BotoCoreError as error:
        raise StorageError(f"{name}: {type(error).__name__} on bucket {bucket!r}{where}: "
                           f"{_one_line(redact(str(error)))}") from None


_UNREACHABLE_REASONS = {
    "EndpointConnectionError": "connection refused or unknown host",
    "ConnectionClosedError": "the connection was closed",
    "ConnectTimeoutError": "connect timeout",
    "ReadTimeoutError": "no answer: read timeout",
}


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "..."


def cluster_node_count() -> int:
    """Alive nodes of the connected Ray cluster (1 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_storage(uri: str, num_nodes: int) -> None:
    """Recovery after a node loss needs checkpoints every node can read: local storage is refused on a cluster."""
    if num_nodes > 1 and not is_s3(uri):
        raise StorageError(f"storage.uri={redact(uri)} is a local path but the Ray cluster has {num_nodes} nodes: "
                           "use shared storage (s3://bucket/prefix) so any node can restore checkpoints")


# -- copies -----------------------------------------------------------------------------------------------------------
def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy the directory at `uri` (local or s3://) into `local_dir`; returns `local_dir`."""
    filesystem, path = _filesystem_and_path(uri)
    try:
        found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if not any(info.type == pafs.FileType.File for info in found):
            raise StorageError(f"{redact(uri)}: no such directory, or nothing in it")
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local_dir.resolve()), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
    except OSError as error:
        raise StorageError(f"{redact(uri)}: cannot download ({_one_line(redact(str(error)))})") from None
    return local_dir
