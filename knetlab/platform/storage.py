"""Checkpoint storage: `storage.uri` (a local path or `s3://bucket/prefix`) as Ray Train's storage, up-front checks
that it can be used, copies to and from it, and the redaction of credentials from URIs and messages.

Credentials come from the standard AWS chain (environment, profile, IAM role), never from the config; a custom
endpoint (MinIO, Ceph, a test server) from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.

Retries: pyarrow's default S3 retry strategy gives up after about a second of outage. `AwsStandardS3RetryStrategy`
draws random delays (up to 2^n s, capped at 20 s) but takes every retry from a budget of 500 tokens (5-10 a retry)
that pyarrow never pays back (its wrapper forwards no request bookkeeping to the AWS SDK): after about 100 retries in
the life of a filesystem object, even 16 uploads in one 40 s outage, it stops retrying at all. We use
`AwsDefaultS3RetryStrategy` instead: deterministic delays 0, 0.1, 0.2, ... 0.05*2^n s, no budget; with 11 attempts a
request keeps trying for about 51 s (10 attempts: 26 s, 8: 6 s), measured through tests/s3_outage.py.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from knetlab.platform.config import ConfigError

S3_RETRY_ATTEMPTS = int(os.environ.get("KNETLAB_S3_RETRY_ATTEMPTS", "11"))
MARKER_PREFIX = ".knetlab-write-test-"


class StorageError(ConfigError):
    """Storage that cannot be used; one line naming the URI (never credentials)."""


# -- redaction --------------------------------------------------------------------------------------------------------
REDACTED = "***"
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")
_SECRET_NAME = r"[\w.-]*(?:secret|password|passwd|token|access_?key|credential|signature|api_?key)[\w.-]*"
_SECRET_ASSIGNMENT = re.compile(rf"(?i)(?P<name>{_SECRET_NAME})(?P<sep>\s*[=:]\s*)(?P<value>[^\s&,;'\"]+)")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def redact(text: str) -> str:
    """`text` (a URI, a message, a config value) without credentials: URI userinfo (`scheme://user:pass@host` ->
    `scheme://***@host`), values of secret-looking names (`?X-Amz-Signature=..`, `password: ..`, `token=..`) and
    AWS access key ids."""
    text = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
    text = _SECRET_ASSIGNMENT.sub(
        lambda m: m[0] if m["value"] == REDACTED else f"{m['name']}{m['sep']}{REDACTED}", text)
    return _AWS_KEY_ID.sub(REDACTED, text)


# -- URIs -------------------------------------------------------------------------------------------------------------
def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix/` -> ("bucket", "prefix")."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{redact(uri)}: an S3 URI needs a bucket (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


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


# -- S3 through pyarrow -----------------------------------------------------------------------------------------------
def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    """The region from the environment, else from the AWS profile (~/.aws/config), else None (the SDK's default)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    try:
        import botocore.session

        return botocore.session.Session().get_config_variable("region")
    except Exception:  # a broken profile file must not break storage that may not need a region
        return None


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the retry strategy above, kept through pickling: pyarrow 25 pickles an
    S3FileSystem without its retry strategy, and Ray Train ships the storage filesystem to every worker by pickling
    it. `options` never hold credentials (they come from the AWS chain where the filesystem is unpickled)."""

    def __init__(self, **options) -> None:
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS), **options)
        self.options = options

    def __reduce__(self):
        return (_rebuild_s3_filesystem, (self.options,))


def _rebuild_s3_filesystem(options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def s3_filesystem() -> RetryingS3FileSystem:
    """pyarrow's S3 filesystem (what Ray Train uploads through), pointed at $AWS_ENDPOINT_URL when set."""
    options: dict = {}
    endpoint = endpoint_url()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host.rstrip("/") if host else scheme, scheme=scheme if host else "https")
    region = s3_region()
    if region:
        options["region"] = region
    return RetryingS3FileSystem(**options)


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
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket, prefix = split_s3_uri(uri)
    endpoint = endpoint_url()
    where = f" at {redact(endpoint)}" if endpoint else ""
    name = f"storage.uri={redact(uri)}"
    # A new session: boto3's default session keeps the credentials it found first, and the check must see the
    # chain as it is now.
    config = botocore.config.Config(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 2})
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=s3_region(), config=config)
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


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy the files under `local_dir` to `uri` (local or s3://), keeping relative paths."""
    source = Path(local_dir)
    if not source.is_dir():
        raise StorageError(f"{source}: no such directory to upload")
    filesystem, path = _filesystem_and_path(uri)
    try:
        pafs.copy_files(str(source.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)
    except OSError as error:
        raise StorageError(f"{redact(uri)}: cannot upload ({_one_line(redact(str(error)))})") from None


def list_dir(uri: str) -> list[str]:
    """Relative paths of every file under `uri` (sorted; empty when there is nothing there)."""
    filesystem, path = _filesystem_and_path(uri)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise StorageError(f"{redact(uri)}: cannot list ({_one_line(redact(str(error)))})") from None
    return sorted(info.path[len(path):].lstrip("/") for info in infos if info.type == pafs.FileType.File)
