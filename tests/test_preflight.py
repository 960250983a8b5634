"""Errors no restart can fix (issue 9): the node checks before training, the storage errors that end a run without
retries, and the pinned local Ray instance.

- Which storage errors are permanent, on real errors: pyarrow's and boto3's against a moto S3 server, a dead port.
- A 2-node cluster on loopback whose second node has no S3 credentials: `knetlab train` (a RAY_ADDRESS driver, one
  worker a node) exits 1 before the first iteration with one line naming that node and the URI.
- On a local Ray started by `init_ray`: every process of the job sees RAY_ADDRESS (the pinned instance), the node
  check of a single node, and a fit with knetlab's RunConfig that ends at once on a missing bucket (no retries, no
  Ray traceback on the console) but still retries a lost connection.

The Ray tests run under the shared lock: `flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_preflight.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_BUCKET, S3Server, free_port, processes_naming, stop_processes, tracking_db

from knetlab.platform.preflight import (
    PermanentStorageError,
    describe_failure,
    find_permanent_storage_error,
    is_permanent_storage_error,
    mark_permanent_storage_errors,
)
from knetlab.platform.trainer import LOCAL_RAY_ENV

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
KNETLAB = Path(sys.executable).parent / "knetlab"


def pyarrow_error(endpoint: str, path: str) -> OSError:
    """The OSError pyarrow (what Ray Train uploads checkpoints with) raises writing `path` through `endpoint`."""
    import pyarrow.fs as pafs

    host = endpoint.split("://", 1)[1]
    filesystem = pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=host, scheme="http",
                                   region="us-east-1", connect_timeout=1,
                                   retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=1))
    try:
        with filesystem.open_output_stream(path) as stream:
            stream.write(b"0")
    except OSError as error:
        return error
    raise AssertionError(f"writing {path} through {endpoint} did not fail")


# -- which errors are permanent -------------------------------------------------------------------------------------
def test_storage_errors_no_restart_can_fix_are_told_from_transient_ones(s3_server: S3Server,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    import botocore.exceptions
    from ray.train import ControllerError, WorkerGroupError

    missing_bucket = pyarrow_error(s3_server.endpoint_url, "no-such-bucket/run/checkpoint_0000010/model.pt")
    assert "NO_SUCH_BUCKET" in str(missing_bucket)
    connection_lost = pyarrow_error(f"http://127.0.0.1:{free_port()}", f"{TEST_BUCKET}/run/model.pt")
    assert "NETWORK_CONNECTION" in str(connection_lost)
    with pytest.raises(botocore.exceptions.ClientError) as no_such_bucket:
        s3_server.client().put_object(Bucket="no-such-bucket", Key="x", Body=b"0")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(botocore.exceptions.NoCredentialsError) as no_credentials:
        boto3.session.Session().client("s3", endpoint_url=s3_server.endpoint_url).put_object(
            Bucket=TEST_BUCKET, Key="x", Body=b"0")

    for permanent in (missing_bucket, no_such_bucket.value, no_credentials.value, PermanentStorageError("denied")):
        assert is_permanent_storage_error(permanent), permanent
    for transient in (connection_lost, ValueError("bad label"), OSError("[Errno 28] No space left on device")):
        assert not is_permanent_storage_error(transient), transient

    # However Ray wraps it: a worker group's failures by rank, the controller's failure, an error raised from it ...
    assert find_permanent_storage_error(WorkerGroupError("failed", {0: ValueError("x"), 1: missing_bucket})) \
        is missing_bucket
    assert is_permanent_storage_error(ControllerError(PermanentStorageError("worker rank 1: denied")))
    try:
        raise RuntimeError("checkpoint upload failed") from missing_bucket
    except RuntimeError as wrapped:
        assert find_permanent_storage_error(wrapped) is missing_bucket
    # ... but not an error merely raised while one was being handled (a retry that recovered, then something else).
    try:
        try:
            raise missing_bucket
        except OSError:
            raise ValueError("later, unrelated") from None
    except ValueError as unrelated:
        assert unrelated.__context__ is missing_bucket and not is_permanent_storage_error(unrelated)

    # In a worker, such an error leaves as PermanentStorageError (pickling to the controller drops the chain).
    with pytest.raises(PermanentStorageError) as marked:
        with mark_permanent_storage_errors():
            raise ValueError("s3://no-such-bucket/ade: cannot list the dataset") from no_such_bucket.value
    assert str(marked.value).startswith("this node: NoSuchBucket: An error occurred (NoSuchBucket)"), marked.value
    with pytest.raises(OSError) as passed_through:
        with mark_permanent_storage_errors():
            raise connection_lost
    assert passed_through.value is connection_lost

    # describe_failure: one line, the permanent error's own words, or the training function's error's first line.
    message = "worker rank 1: OSError: ... AWS Error ACCESS_DENIED ... (not retried: a restart would fail the same way)"
    assert describe_failure(ControllerError(PermanentStorageError(message))) == message
    summary = describe_failure(WorkerGroupError("Training failed\nTraceback ...", {0: ValueError("bad\nlabel")}))
    assert summary.startswith("ValueError: bad (tracebacks in Ray's logs") and "\n" not in summary


# -- a 2-node cluster whose second node has no S3 credentials --------------------------------------------------------
@dataclass
class TwoNodes:
    address: str  # the GCS address, what RAY_ADDRESS holds
    head_id: str
    second_id: str  # the node without credentials


@pytest.fixture
def second_node_without_credentials(s3_server: S3Server, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoNodes]:
    """A head and a second node of one Ray cluster on this machine, on loopback, 2 CPUs each, made with Ray's
    `ray.cluster_utils.Cluster` as in tests/test_multinode.py. A node inherits the environment of the process that
    starts it: the head gets the S3 test credentials, the second node is started with none (no key in the
    environment, no credentials or config file, no instance metadata), as a node with a missing IAM role would be.
    No dashboard: nothing here trains. Everything started here is stopped at the end, never by `ray stop`."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # one Ray at a time in this process
        ray.shutdown()
    temp_dirs = [Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")) for prefix in ("kpfh", "kpfw")]
    (temp_dirs[0] / "ray").mkdir()  # Ray's "current cluster" address file, under RAY_TMPDIR, away from other clusters
    for key, value in {**LOCAL_RAY_ENV, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(temp_dirs[0])}.items():
        monkeypatch.setenv(key, value)
    for key in ("RAY_ADDRESS", "KNETLAB_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    common = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "object_store_memory": 80 * 1024 * 1024,
              "min_worker_port": 0, "max_worker_port": 0}
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            **common, "temp_dir": str(temp_dirs[0]), "gcs_server_port": free_port(), "include_dashboard": False,
            "metrics_export_port": free_port()})
        with monkeypatch.context() as node_env:
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                node_env.delenv(key, raising=False)
            node_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
            node_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
            node_env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            second = cluster.add_node(**common, temp_dir=str(temp_dirs[1]), metrics_export_port=free_port())
        assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"  # back for the driver
        yield TwoNodes(address=cluster.address, head_id=cluster.head_node.node_id, second_id=second.node_id)
    finally:
        if cluster is not None:
            cluster.shutdown()  # kills the processes of these two nodes only
        stop_processes(processes_naming(temp_dirs))  # what outlived the cluster's shutdown
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_without_storage_credentials_fails_the_run_before_it_starts_in_one_line(
    second_node_without_credentials: TwoNodes, s3_server: S3Server, tmp_path: Path
) -> None:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    nodes = second_node_without_credentials
    generate_synthetic_ade20k(tmp_path / "data", num_train=8, num_val=2)
    uri = f"s3://{TEST_BUCKET}/preflight"
    command = [
        str(KNETLAB), "train", str(SMOKE), f"data.root={tmp_path / 'data'}", "data.synthesize=false",
        "trainer.num_workers=2", "trainer.cpus_per_worker=1", "trainer.placement_strategy=STRICT_SPREAD",
        "trainer.max_iters=4", "trainer.eval_interval=4", "trainer.checkpoint_interval=4", "trainer.max_failures=3",
        "schedule.warmup_iters=1", "schedule.milestones=[]", f"storage.uri={uri}",
        f"tracking.uri={tracking_db(tmp_path)}", "tracking.run_name=preflight",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": nodes.address, "KNETLAB_RUNS_DIR": str(tmp_path / "runs")}
    started = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    print(f"knetlab train on the 2-node cluster failed its node check after {elapsed:.1f} s")

    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-6000:]
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("knetlab: error: ")]
    assert len(errors) == 1, result.stderr
    error = errors[0]
    print(error)
    assert f"node 127.0.0.1 ({nodes.second_id[:12]})" in error, error
    assert nodes.head_id[:12] not in error, error  # the head has credentials: only the second node is named
    assert f"storage.uri={uri}:" in error and "no AWS credentials found" in error, error
    assert "IAM role" in error, error  # the likely cause
    # Before the first iteration: no run started, nothing written to the bucket (the check deletes its marker).
    assert "[knetlab] run " not in result.stdout, result.stdout
    assert s3_server.list_keys("preflight/") == []


# -- a local Ray instance: pinned, a node check, a fit that ends at once on a permanent storage error ----------------
@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """A local Ray started by knetlab's `init_ray`; yields its GCS address."""
    import ray

    from knetlab.platform.trainer import init_ray

    if ray.is_initialized():
        ray.shutdown()
    before = os.environ.get("RAY_ADDRESS")
    assert before is None, "the tests start their own Ray"
    init_ray()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_every_process_of_a_local_run_knows_its_own_ray_instance(local_ray: str) -> None:
    import ray

    assert local_ray.startswith("127.0.0.1:"), local_ray  # on loopback
    assert "RAY_ADDRESS" not in os.environ  # the driver's environment is left alone

    @ray.remote(num_cpus=0)
    class Child:
        def address(self) -> str | None:
            return os.environ.get("RAY_ADDRESS")

    @ray.remote(num_cpus=0)
    def start_detached_child() -> str | None:
        # As Train's controller starts its placement-group cleaner: a detached actor, from inside the job.
        child = Child.options(lifetime="detached", name=f"child-{os.getpid()}").remote()
        try:
            return ray.get(child.address.remote())
        finally:
            ray.kill(child)

    assert ray.get(start_detached_child.remote()) == local_ray


@pytest.mark.slow
@pytest.mark.ray
def test_the_node_check_on_a_single_node(local_ray: str, tmp_path: Path) -> None:
    from knetlab.data.synthetic import generate_synthetic_ade20k
    from knetlab.platform.preflight import NodeCheckError, check_worker_nodes

    generate_synthetic_ade20k(tmp_path / "data", num_train=2, num_val=1)
    reports = check_worker_nodes(str(tmp_path / "data"), str(tmp_path / "ckpt"), {"CPU": 1})
    assert len(reports) == 1 and reports[0].problems == [] and reports[0].node_ip == "127.0.0.1", reports
    assert not list((tmp_path / "ckpt").iterdir())  # the marker was deleted
    assert check_worker_nodes(str(tmp_path / "data"), str(tmp_path / "ckpt"), {"CPU": 64}) == []  # no node fits

    with pytest.raises(NodeCheckError) as missing:
        check_worker_nodes(str(tmp_path / "elsewhere"), str(tmp_path / "ckpt"), {"CPU": 1})
    message = str(missing.value)
    assert message.startswith(f"node 127.0.0.1 ({reports[0].node_id[:12]}) cannot read data.root={tmp_path}/elsewhere")
    assert "not at this path on this node" in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.ray
def test_a_missing_bucket_ends_the_fit_without_retries_a_lost_connection_is_retried(
    local_ray: str, s3_server: S3Server, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from ray.train import ScalingConfig, TrainingFailedError
    from ray.util.state import list_actors

    from knetlab.platform.config import load_config
    from knetlab.platform.ray_internals import torch_trainer_class
    from knetlab.platform.trainer import build_run_config

    def write_checkpoint(config: dict) -> None:
        """Count this attempt, then write a checkpoint file through pyarrow, as Ray Train's upload does; its error
        arrives wrapped (raised from), as a loop's own error about it would."""
        import uuid

        import pyarrow.fs as pafs

        from knetlab.platform.preflight import mark_permanent_storage_errors

        attempts = Path(config["attempts"])
        (attempts / uuid.uuid4().hex).touch()
        attempt = len(list(attempts.iterdir()))
        print(f"[test] attempt {attempt}", flush=True)
        endpoint = config["endpoints"][min(attempt, len(config["endpoints"])) - 1]
        filesystem = pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=endpoint,
                                       scheme="http", region="us-east-1", connect_timeout=1,
                                       retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=1))
        with mark_permanent_storage_errors():  # what trainer.train_loop_entry wraps the training loop in
            try:
                with filesystem.open_output_stream(config["path"]) as stream:
                    stream.write(b"0")
            except OSError as error:
                raise RuntimeError(f"attempt {attempt}: the checkpoint upload failed") from error

    def fit(name: str, endpoints: list[str], path: str) -> tuple[BaseException | None, int]:
        cfg = load_config(SMOKE, [f"storage.uri={tmp_path / 'ckpt'}", "trainer.max_failures=2"])
        attempts = tmp_path / name
        attempts.mkdir()
        config = {"attempts": str(attempts), "endpoints": endpoints, "path": path}
        trainer = torch_trainer_class()(write_checkpoint, train_loop_config=config,
                                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                                         run_config=build_run_config(cfg, run_name=name))
        try:
            error = trainer.fit().error
        except TrainingFailedError as raised:  # Ray Train V2 raises the run's error
            error = raised
        return error, len(list(attempts.iterdir()))

    moto = s3_server.endpoint_url.split("://", 1)[1]
    # A missing bucket: the first attempt fails, and with trainer.max_failures=2 there is no second.
    error, attempts = fit("missing-bucket", [moto], "no-such-bucket/run/model.pt")
    assert attempts == 1, attempts
    assert error is not None and is_permanent_storage_error(error), error
    summary = describe_failure(error)
    assert summary.startswith("worker rank 0: node 127.0.0.1 (") and "OSError: " in summary, summary
    assert "NO_SUCH_BUCKET" in summary and "(not retried" in summary and "\n" not in summary, summary
    # Ray Train's failure reports (with tracebacks) stay in its log files: none reach the console.
    output, deadline = "", time.monotonic() + 20
    while "[test] attempt 1" not in output and time.monotonic() < deadline:
        time.sleep(0.5)
        captured = capfd.readouterr()
        output += captured.out + captured.err
    time.sleep(3)  # the worker's and controller's error lines come after the attempt line, if they come at all
    captured = capfd.readouterr()
    output += captured.out + captured.err
    assert "[test] attempt 1" in output, output
    assert "Traceback" not in output and "NO_SUCH_BUCKET" not in output, output

    # A lost connection (nothing listens on the first endpoint) is retried: the second attempt writes to moto.
    error, attempts = fit("connection-lost", [f"127.0.0.1:{free_port()}", moto], f"{TEST_BUCKET}/run/model.pt")
    assert error is None, error
    assert attempts == 2
    assert s3_server.list_keys("run/") == ["run/model.pt"]

    # The runs' actors as Ray lists them: Train's controller and placement-group cleaner, and no DatasetManager, which
    # Ray Train would start for every run although knetlab's have no Ray Dataset (ray_internals.torch_trainer_class).
    classes = {actor.class_name for actor in list_actors(address=local_ray, limit=10_000)}
    assert {"TrainController", "PlacementGroupCleaner"} <= classes and "DatasetManager" not in classes, classes
