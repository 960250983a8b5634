"""Object storage (S3 and S3-compatible stores) for all of knetlab: checkpoint storage, the dataset cache and
pretrained weights. `s3://bucket/key` URIs, the endpoint and region read one way, the boto3 client, and pyarrow's
S3 filesystem (what Ray Train uploads checkpoints through) with a retry strategy that outlasts a short outage.

Credentials come from the standard AWS chain (environment, profile, IAM role), never from a URI; a custom endpoint
(MinIO, Ceph, a test server) from `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`; the region from `AWS_REGION`,
`AWS_DEFAULT_REGION`, else the AWS profile.

Retries: pyarrow's default S3 retry strategy gives up after about a second of outage. `AwsStandardS3RetryStrategy`
draws random delays (up to 2^n s, capped at 20 s) but takes every retry from a budget of 500 tokens (5-10 a retry)
that pyarrow never pays back (its wrapper forwards no request bookkeeping to the AWS SDK): after about 100 retries in
the life of a filesystem object, even 16 uploads in one 40 s outage, it stops retrying at all. We use
`AwsDefaultS3RetryStrategy` instead: deterministic delays 0, 0.1, 0.2, ... 0.05*2^n s, no budget; with 11 attempts a
request keeps trying for about 51 s (10 attempts: 26 s, 8: 6 s), measured through tests/s3_outage.py.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs as pafs

from knetlab.redact import CREDENTIALS_BELONG, has_userinfo, redact

S3_RETRY_ATTEMPTS = int(os.environ.get("KNETLAB_S3_RETRY_ATTEMPTS", "11"))


class S3UriError(ValueError):
    """An s3:// URI that cannot name an object or prefix; the message names it (redacted)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix/` -> ("bucket", "prefix"), the prefix without surrounding slashes. A URI without a bucket,
    or with credentials in it (`s3://key:secret@bucket`), is an S3UriError that does not repeat the credentials."""
    uri = str(uri)
    if not is_s3(uri):
        raise S3UriError(f"{redact(uri)}: not an s3:// URI (expected s3://bucket/prefix)")
    if has_userinfo(uri):
        raise S3UriError(f"{redact(uri)}: credentials in the URI are refused: {CREDENTIALS_BELONG}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise S3UriError(f"{uri}: no bucket in the URI; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def endpoint_url() -> str | None:
    """The custom S3 endpoint ($AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL), or None for AWS itself."""
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


def s3_client(**config: Any) -> Any:
    """A boto3 S3 client at `endpoint_url()` in `s3_region()`; `config` are botocore `Config` options (timeouts,
    retries, pool size). A new session each time: boto3's default session keeps the credentials it found first, and
    a check must see the chain as it is now."""
    import boto3
    import botocore.config

    return boto3.session.Session().client("s3", endpoint_url=endpoint_url(), region_name=s3_region(),
                                          config=botocore.config.Config(**config) if config else None)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the retry strategy above, kept through pickling: pyarrow 25 pickles an
    S3FileSystem without its retry strategy, and Ray Train ships the storage filesystem to every worker by pickling
    it. `options` never hold credentials (they come from the AWS chain where the filesystem is unpickled)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS), **options)
        self.options = options

    def __reduce__(self) -> tuple:
        return (_rebuild_s3_filesystem, (self.options,))


def _rebuild_s3_filesystem(options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def s3_filesystem() -> RetryingS3FileSystem:
    """pyarrow's S3 filesystem (what Ray Train uploads through), pointed at `endpoint_url()` when set."""
    options: dict[str, Any] = {}
    endpoint = endpoint_url()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host.rstrip("/") if host else scheme, scheme=scheme if host else "https")
    region = s3_region()
    if region:
        options["region"] = region
    return RetryingS3FileSystem(**options)
