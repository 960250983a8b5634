"""Checkpoint storage: `storage.uri` (a local path or `s3://bucket/prefix`) as Ray Train's storage, with up-front
reachability checks and retries for transient object-store failures. Credentials come from the standard AWS
chain (environment, profile, IAM role) and never from the config; a custom endpoint from `AWS_ENDPOINT_URL`."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from knetlab.platform.config import ConfigError, redact

# A checkpoint upload that meets a few seconds of object-store outage is retried with backoff instead of failing
# the run: the standard AWS strategy backs off exponentially; 12 attempts span well over 10 s.
S3_RETRY_ATTEMPTS = int(os.environ.get("KNETLAB_S3_RETRY_ATTEMPTS", "12"))


class StorageError(ConfigError):
    """Storage that cannot be used; one line naming the URI (never credentials)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{redact(uri)}: an S3 URI needs a bucket, e.g. s3://my-bucket/knetlab")
    return bucket, prefix.strip("/")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the retry strategy above, kept through pickling: pyarrow 25 pickles an
    S3FileSystem without its retry strategy, and Ray Train ships the storage filesystem to every worker by pickling
    it (the workers' uploads then gave up after about a second of outage). `options` hold no credentials."""

    def __init__(self, **options) -> None:
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS), **options)
        self.options = options

    def __reduce__(self):
        return (_rebuild_s3_filesystem, (self.options,))


def _rebuild_s3_filesystem(options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem (what Ray Train uploads through), pointed at AWS_ENDPOINT_URL when set."""
    kwargs: dict = {}
    endpoint = endpoint_url()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return RetryingS3FileSystem(**kwargs)


def storage_target(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for `RunConfig(storage_filesystem=..., storage_path=...)`."""
    if is_s3(uri):
        bucket, prefix = split_s3_uri(uri)
        return s3_filesystem(), f"{bucket}/{prefix}".rstrip("/")
    return None, str(Path(uri).resolve())


def join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def check_storage(uri: str) -> None:
    """Before any worker starts: the bucket answers and accepts a write with the current credentials (or the local
    directory can be written)."""
    if not is_s3(uri):
        path = Path(uri)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".knetlab-write-test-{uuid.uuid4().hex}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise StorageError(f"storage.uri={uri}: cannot write there ({error.strerror or error})") from None
        return
    import boto3
    import botocore.exceptions

    bucket, prefix = split_s3_uri(uri)
    client = boto3.client("s3", endpoint_url=endpoint_url(),
                          config=botocore.config.Config(connect_timeout=5, read_timeout=10,
                                                        retries={"max_attempts": 2}))
    key = f"{prefix}/.knetlab-write-test-{uuid.uuid4().hex}".lstrip("/")
    where = f" at {endpoint_url()}" if endpoint_url() else ""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"ok")
        client.delete_object(Bucket=bucket, Key=key)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(f"storage.uri={redact(uri)}: no AWS credentials found (environment, profile or IAM role)"
                           ) from None
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "?")
        if code in ("NoSuchBucket", "404"):
            raise StorageError(f"storage.uri={redact(uri)}: bucket {bucket!r} does not exist{where}") from None
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            raise StorageError(f"storage.uri={redact(uri)}: access denied ({code}): check the AWS credentials"
                               ) from None
        raise StorageError(f"storage.uri={redact(uri)}: S3 error {code}{where}") from None
    except botocore.exceptions.EndpointConnectionError:
        raise StorageError(f"storage.uri={redact(uri)}: bucket {bucket!r} not reachable{where}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise StorageError(f"storage.uri={redact(uri)}: {type(error).__name__}{where}") from None


def cluster_node_count() -> int:
    """Alive nodes of the connected Ray cluster (1 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_storage(uri: str, num_nodes: int) -> None:
    """Recovery after a node loss needs checkpoints every node can read: local storage is refused on a cluster."""
    if num_nodes > 1 and not is_s3(uri):
        raise StorageError(f"storage.uri={uri} is a local path but the Ray cluster has {num_nodes} nodes: use shared "
                           "storage (s3://bucket/prefix) so any node can restore checkpoints")


def _filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_s3(uri):
        bucket, prefix = split_s3_uri(uri)
        return s3_filesystem(), f"{bucket}/{prefix}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy the directory at `uri` (local or s3://) into `local_dir`."""
    filesystem, path = _filesystem_and_path(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory and not is_s3(uri):
        raise StorageError(f"{redact(uri)}: no such directory")
    if not filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        raise StorageError(f"{redact(uri)}: nothing there")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir.resolve()), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def upload_dir(local_dir: str | Path, uri: str) -> None:
    filesystem, path = _filesystem_and_path(uri)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem)


def list_dir(uri: str) -> list[str]:
    """Relative paths of every file under `uri`."""
    filesystem, path = _filesystem_and_path(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(info.path[len(path):].lstrip("/") for info in infos if info.type == pafs.FileType.File)
