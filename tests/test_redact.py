"""knetlab.redact: one set of rules for every config, MLflow param/tag, error message and log line."""

from __future__ import annotations

import pytest

from knetlab.redact import CREDENTIALS_BELONG, has_userinfo, redact


@pytest.mark.parametrize(("text", "expected"), [
    # URI userinfo, user and password alike
    ("https://alice:hunter2@mlflow.example.com:5000", "https://***@mlflow.example.com:5000"),
    ("postgresql://user:pw@db/mlflow", "postgresql://***@db/mlflow"),
    ("https://ghp_TOKEN123@github.com/x", "https://***@github.com/x"),
    ("s3://AKIAIOSFODNN7EXAMPLE:S3cr3tPass@bucket/x", "s3://***@bucket/x"),
    ("s3://key:p@ss@bucket/x", "s3://***@bucket/x"),
    # user:password@host quoted without its scheme, as botocore quotes a bucket name
    ("ParamValidationError on bucket 'AKIAIOSFODNN7EXAMPLE:S3cr3tPass@bucket'", "ParamValidationError on bucket "
                                                                                "'***@bucket'"),
    ("Invalid bucket name \"key:S3cr3tPass@bucket\": ...", "Invalid bucket name \"***@bucket\": ..."),
    # nothing to hide
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("runs/checkpoints", "runs/checkpoints"),
    ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),
    ("at 12:30 the run stopped", "at 12:30 the run stopped"),
    ("mail git@github.com", "mail git@github.com"),
    # values of secret-looking names, query parameters included
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIDX&X-Amz-Signature=abc123&x=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1"),
    ("s3://bucket/w.pth?X-Amz-Signature=abcd&part=1", "s3://bucket/w.pth?X-Amz-Signature=***&part=1"),
    ("https://h/p?my%20token=abc&b=2", "https://h/p?my%20token=***&b=2"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI and password: hunter2", "AWS_SECRET_ACCESS_KEY=*** and password: ***"),
    ("api_token=***", "api_token=***"),
    # AWS access key ids anywhere
    ("key id AKIAIOSFODNN7EXAMPLE in a message", "key id *** in a message"),
    ("session ASIAIOSFODNN7EXAMPLE", "session ***"),
])
def test_redact_removes_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(redact(text)) == expected


def test_redact_takes_any_object() -> None:
    assert redact(ValueError("s3://k:secret@b")) == "s3://***@b"


def test_userinfo_is_detected_only_before_the_host() -> None:
    assert has_userinfo("s3://AKIAIOSFODNN7EXAMPLE:secret@bucket/x")
    assert has_userinfo(" http://user@host:5000")
    assert not has_userinfo("s3://bucket/path/with@sign")
    assert not has_userinfo("runs/ckpt")
    assert "environment" in CREDENTIALS_BELONG and "IAM role" in CREDENTIALS_BELONG
