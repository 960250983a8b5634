"""knetlab.platform.storage against real servers on loopback: moto's S3 server (the `s3_server` fixture), moto with
IAM authentication on (a subprocess that rejects unknown credentials), and tests/s3_outage.py's proxy in front of
moto to cut the object store off for a few seconds during an upload."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import S3Server, free_port, wait_for_http
from s3_outage import OutageProxy

from knetlab.platform.storage import (
    StorageError,
    check_storage,
    cluster_node_count,
    download_dir,
    join_uri,
    require_shared_storage,
    storage_target,
)


def one_line_error(call, *args) -> str:
    with pytest.raises(StorageError) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def files(keys: list[str]) -> list[str]:
    """Object keys without pyarrow's directory markers ("prefix/")."""
    return sorted(key for key in keys if not key.endswith("/"))


def upload(local_dir: Path, uri: str) -> None:
    """Copy a local directory to `uri` the way Ray Train uploads a checkpoint: pyarrow through `storage_target`."""
    filesystem, path = storage_target(uri)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem or pafs.LocalFileSystem())


# -- URIs -------------------------------------------------------------------------------------------------------------
def test_join_uri() -> None:
    assert join_uri("s3://b/ckpt/", "run", "/checkpoint_0000010/") == "s3://b/ckpt/run/checkpoint_0000010"
    assert join_uri("runs/ckpt", "a", "", "b") == "runs/ckpt/a/b"


def test_storage_target_local_and_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_target("runs/ckpt") == (None, str(tmp_path / "runs" / "ckpt"))
    assert storage_target(f"file://{tmp_path}/x") == (None, str(tmp_path / "x"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    filesystem, path = storage_target("s3://my-bucket/a/b/")
    assert isinstance(filesystem, pafs.S3FileSystem) and path == "my-bucket/a/b"
    assert filesystem.region == "eu-west-3"
    rebuilt = pickle.loads(pickle.dumps(filesystem))  # as Ray ships it to the workers
    assert type(rebuilt) is type(filesystem) and rebuilt.options == filesystem.options
    assert "access_key" not in filesystem.options and "secret_key" not in filesystem.options
    assert storage_target("s3://only-bucket")[1] == "only-bucket"
    assert "s3://bucket/prefix" in one_line_error(storage_target, "s3:///prefix")
    assert "'gs'" in one_line_error(storage_target, "gs://bucket/x")


def test_endpoint_from_aws_endpoint_url_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.local:9000/")
    filesystem, _ = storage_target("s3://b/x")
    assert filesystem.options["endpoint_override"] == "minio.local:9000"
    assert filesystem.options["scheme"] == "https"


# -- local storage -----------------------------------------------------------------------------------------------------
def test_check_local_storage(tmp_path: Path) -> None:
    target = tmp_path / "new" / "ckpt"
    check_storage(str(target))
    assert target.is_dir() and list(target.iterdir()) == []  # the marker is gone
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    message = one_line_error(check_storage, str(blocker / "ckpt"))
    assert message.startswith(f"storage.uri={blocker / 'ckpt'}: cannot write"), message


def test_require_shared_storage_on_a_multi_node_cluster() -> None:
    require_shared_storage("runs/x", 1)
    require_shared_storage("s3://bucket/x", 3)
    message = one_line_error(require_shared_storage, "runs/x", 2)
    assert "storage.uri=runs/x" in message and "2 nodes" in message and "s3://" in message


def test_cluster_node_count_without_ray() -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray cluster is connected in this process")
    assert cluster_node_count() == 1


def test_local_copies_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "sub" / "b.bin").write_bytes(b"\x00\x01")
    upload(source, str(tmp_path / "store" / "run"))
    out = download_dir(str(tmp_path / "store" / "run"), tmp_path / "out")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["a.txt", "sub/b.bin"]
    assert (out / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert str(tmp_path / "nothing") in one_line_error(download_dir, str(tmp_path / "nothing"), tmp_path / "o2")


# -- S3 ----------------------------------------------------------------------------------------------------------------
def test_check_s3_storage_passes_and_leaves_nothing(s3_server: S3Server) -> None:
    check_storage(f"s3://{s3_server.bucket}/ckpt")
    check_storage(f"s3://{s3_server.bucket}")
    assert s3_server.list_keys() == []


def test_s3_copies_round_trip(s3_server: S3Server, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint_0000010"
    (source / "nested").mkdir(parents=True)
    (source / "model.pt").write_bytes(os.urandom(300_000))
    (source / "meta.json").write_text(json.dumps({"iteration": 10}))
    (source / "nested" / "x.txt").write_text("x")
    uri = join_uri(f"s3://{s3_server.bucket}/ckpt", "run", source.name)
    upload(source, uri)
    assert files(s3_server.list_keys("ckpt/")) == [
        "ckpt/run/checkpoint_0000010/meta.json", "ckpt/run/checkpoint_0000010/model.pt",
        "ckpt/run/checkpoint_0000010/nested/x.txt"]
    out = download_dir(uri, tmp_path / "downloaded")
    assert (out / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    assert (out / "nested" / "x.txt").read_text() == "x"
    missing = f"s3://{s3_server.bucket}/ckpt/no-such-run"
    assert missing in one_line_error(download_dir, missing, tmp_path / "o2")


def test_wrong_bucket_is_one_line_error(s3_server: S3Server) -> None:
    message = one_line_error(check_storage, "s3://no-such-bucket/ckpt")
    assert message.startswith("storage.uri=s3://no-such-bucket/ckpt: bucket 'no-such-bucket' does not exist at "
                              f"{s3_server.endpoint_url}"), message


def test_unreachable_endpoint_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    started = time.monotonic()
    message = one_line_error(check_storage, "s3://knetlab-test/x")
    assert message.startswith(f"storage.uri=s3://knetlab-test/x: bucket 'knetlab-test' not reachable at "
                              f"http://127.0.0.1:{closed} ("), message
    assert time.monotonic() - started < 30  # a bound against hanging for minutes, not a timing figure


def test_missing_credentials_is_one_line_error(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    message = one_line_error(check_storage, f"s3://{s3_server.bucket}/x")
    assert "no AWS credentials found" in message and f"s3://{s3_server.bucket}/x" in message


# -- S3 with authentication: moto rejects unknown credentials ----------------------------------------------------------
@pytest.fixture(scope="module")
def s3_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto server subprocess with IAM authentication on: the first 4 requests (creating a user, its access key,
    an s3:* policy, a bucket) go unauthenticated (INITIAL_NO_AUTH_ACTION_COUNT=4), every later one must be signed
    with that user's key. A subprocess, because moto keeps that setting process-wide."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto-auth") / "moto.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}, stdout=log,
                               stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", timeout=60, process=process)
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="knetlab")
        key = iam.create_access_key(UserName="knetlab")["AccessKey"]
        iam.put_user_policy(UserName="knetlab", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **setup).create_bucket(Bucket="knetlab-auth")
        yield {"endpoint": endpoint, "bucket": "knetlab-auth", "key_id": key["AccessKeyId"],
               "secret": key["SecretAccessKey"]}
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_wrong_credentials_are_one_line_error_without_secrets(s3_with_auth: dict[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    auth = s3_with_auth
    uri = f"s3://{auth['bucket']}/ckpt"
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth["endpoint"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth["secret"])
    check_storage(uri)  # the right key is accepted: the server does check

    for key_id, secret, code in [(auth["key_id"], "wrong-secret-value", "SignatureDoesNotMatch"),
                                 ("AKIAUNKNOWNKEY000000", "another-wrong-secret", "InvalidAccessKeyId")]:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        message = one_line_error(check_storage, uri)
        assert message.startswith(f"storage.uri={uri}: access denied ({code})"), message
        assert "check the AWS credentials" in message and auth["endpoint"] in message
        for secret_text in (secret, auth["secret"], key_id):
            assert secret_text not in message


# -- an object-store outage during an upload ---------------------------------------------------------------------------
def make_checkpoint(directory: Path, count: int = 6) -> dict[str, bytes]:
    directory.mkdir(parents=True)
    contents = {f"part_{i}.bin": os.urandom(50_000 + i) for i in range(count)}
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return contents


def upload_request(prefix: str):
    return lambda data: f"/{prefix}/".encode() in data[:400] and not data.startswith(b"GET ")


def test_upload_survives_a_5s_outage(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with OutageProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        filesystem, path = storage_target(f"s3://{s3_server.bucket}/outage")
        filesystem = pickle.loads(pickle.dumps(filesystem))  # as Ray Train's workers get it
        contents = make_checkpoint(tmp_path / "checkpoint_0000010")
        proxy.outage_on_request(upload_request("outage/run/checkpoint_0000010"), 5.0)
        started = time.monotonic()
        pafs.copy_files(str(tmp_path / "checkpoint_0000010"), f"{path}/run/checkpoint_0000010",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
        took = time.monotonic() - started
    assert len(proxy.outages) == 1, "the outage never started"
    assert proxy.refused > 0, "no request was retried during the outage"
    assert took >= 5.0, f"the upload finished in {took:.1f}s, inside the outage: it did not go through the proxy"
    keys = files(s3_server.list_keys("outage/run/checkpoint_0000010/"))
    assert keys == sorted(f"outage/run/checkpoint_0000010/{name}" for name in contents)
    client = s3_server.client()
    for name, data in contents.items():
        body = client.get_object(Bucket=s3_server.bucket, Key=f"outage/run/checkpoint_0000010/{name}")["Body"]
        assert body.read() == data


def test_pyarrow_default_retries_do_not_survive_the_outage(s3_server: S3Server, tmp_path: Path) -> None:
    """The control for the test above: the same outage fails an upload through pyarrow's default S3 filesystem
    (3 attempts), so the test above proves the retries, not a harmless outage."""
    with OutageProxy(s3_server.port) as proxy:
        filesystem = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{proxy.port}", scheme="http",
                                       region="us-east-1", access_key="testing", secret_key="testing")
        make_checkpoint(tmp_path / "ck", count=2)
        proxy.outage_on_request(upload_request("ckpt/control"), 5.0)
        with pytest.raises(OSError):
            pafs.copy_files(str(tmp_path / "ck"), f"{s3_server.bucket}/ckpt/control",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
        assert len(proxy.outages) == 1
        proxy.wait_until_up()
