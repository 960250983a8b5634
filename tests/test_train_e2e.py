"""End-to-end acceptance of `knetlab train` (issue 4): real runs of experiments/smoke.yaml with tiny settings on a
real local Ray cluster, checkpoints in a moto S3 server (behind tests/s3_outage.py's proxy that can cut it off), a real
`mlflow server`; worker kill and restart, S3 and MLflow outages, and the one-line errors for bad input (resume:
tests/test_train_resume.py).

Ray tests share one Ray cluster per module (started after the S3 environment is set, so workers inherit it).
Run under the shared lock: `flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_train_e2e.py`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FAKE_AWS_ENV, TEST_BUCKET, FileServer, MlflowServer, S3Server, free_port, tracking_db
from s3_outage import OutageProxy

from knetlab.platform.config import load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
EXAMPLE = REPO / "experiments" / "custom" / "example.yaml"  # a dataset of your own
KNETLAB = Path(sys.executable).parent / "knetlab"
CHECKPOINT_FILES = {"model.pt", "train_state.pt", "meta.json", "config.yaml", "rng_rank0.pt", "rng_rank1.pt"}


# -- the module's cluster: moto S3 (behind the proxy), synthetic data, one Ray --------------------------------------
@dataclass
class Cluster:
    s3: S3Server  # moto itself, for the test's own listings
    proxy: OutageProxy
    data_root: Path
    pid_dir: Path

    def list_keys(self, prefix: str) -> list[str]:
        return self.s3.list_keys(prefix)

    def read_json(self, key: str) -> dict:
        return json.loads(self.s3.client().get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import ray
    from moto.server import ThreadedMotoServer

    from knetlab.data.synthetic import generate_synthetic_ade20k
    from knetlab.platform.trainer import init_ray

    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    proxy = OutageProxy(port)
    env = {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
           "KNETLAB_WORKER_PID_DIR": str(root / "pids"), "KNETLAB_RUNS_DIR": str(root / "runs"),
           "KNETLAB_S3_RETRY_ATTEMPTS": os.environ.get("KNETLAB_S3_RETRY_ATTEMPTS", "12")}
    s3 = S3Server(endpoint_url=f"http://127.0.0.1:{port}", bucket=TEST_BUCKET, port=port, _server=moto)
    result = Cluster(s3=s3, proxy=proxy, data_root=root / "data", pid_dir=root / "pids")
    s3.client().create_bucket(Bucket=TEST_BUCKET)
    generate_synthetic_ade20k(result.data_root, num_train=16, num_val=2)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)  # before ray.init: the workers inherit it
        try:
            init_ray()
            yield result
        finally:
            ray.shutdown()
            proxy.close()
            moto.stop()


def smoke_config(cluster: Cluster, tmp_path: Path, name: str, *overrides: str, storage: str | None = None,
                 tracking: str | None = None, experiment: Path = SMOKE):
    return load_config(experiment, [
        f"data.root={cluster.data_root}", "data.synthesize=false", "data.crop_size=64", "data.batch_size=4",
        "trainer.max_iters=20", "trainer.eval_interval=10", "trainer.checkpoint_interval=10",
        "trainer.log_interval=5", "schedule.warmup_iters=5", "schedule.milestones=[15]",
        f"storage.uri={storage or tmp_path / 'ckpt'}",
        f"tracking.uri={tracking or tracking_db(tmp_path)}",
        f"tracking.run_name={name}", f"tracking.experiment=e2e-{name}", *overrides,
    ])


def steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    from knetlab.platform.tracking import metric_history

    return sorted(step for step, _ in metric_history(tracking_uri, run_id, key))


def assert_worker_output(capfd: pytest.CaptureFixture, text: str) -> None:
    """Worker output reaches the driver's stdout through Ray's log monitor, possibly after fit() returns."""
    output = ""
    deadline = time.monotonic() + 15
    while text not in output and time.monotonic() < deadline:
        time.sleep(0.5)
        output += capfd.readouterr().out
    assert text in output


# -- (a) + (d) + (h): a 2-worker run to S3 through an S3 outage during a checkpoint save, all it logs to MLflow -----
# On a dataset of its own (issue 12): 5 named classes, experiments/custom/example.yaml; the names reach the per-class
# metrics and artifacts, the params and the checkpoint's config.
@pytest.mark.slow
@pytest.mark.ray
def test_two_worker_run_checkpoints_to_s3_through_an_outage_and_logs_everything_to_mlflow(
        cluster: Cluster, tmp_path: Path, mlflow_server: MlflowServer, file_server: FileServer) -> None:
    import yaml
    from test_pretrained_fetch import tiny_weights_file

    from knetlab.data import class_names, generate_synthetic_custom
    from knetlab.platform.trainer import run_training

    name = "s3-run"
    outage_s = 10.0  # pyarrow's default retries give up after about a second

    def checkpoint_upload(data: bytes) -> bool:
        head = data[:300]
        return head.startswith(b"PUT ") and f"/{name}/checkpoint_0000010/".encode() in head

    outages_before, refused_before = len(cluster.proxy.outages), cluster.proxy.refused
    cluster.proxy.outage_on_request(checkpoint_upload, outage_s)
    _, digest = tiny_weights_file(file_server.root / "pretrain" / "tiny.pth")  # backbone weights over HTTP
    data = generate_synthetic_custom(tmp_path / "synthetic-custom", num_train=16, num_val=2)
    names = ("sky", "meadow", "pond", "kite", "traffic cone")
    cfg = smoke_config(cluster, tmp_path, name, f"model.pretrained={file_server.url('pretrain/tiny.pth')}",
                       f"model.pretrained_sha256={digest[:8]}", f"model.cache_dir={tmp_path / 'weights'}",
                       f"data.root={data}", "trainer.num_workers=2", storage=f"s3://{TEST_BUCKET}/ckpt",
                       tracking=mlflow_server.uri, experiment=EXAMPLE)
    assert cfg.model.num_classes == 5 and class_names(cfg) == names
    try:
        summary = run_training(cfg)
    finally:
        cluster.proxy.trigger = None
    assert len(cluster.proxy.outages) == outages_before + 1, "the outage never started: no checkpoint upload"
    assert cluster.proxy.refused > refused_before, "nothing retried during the outage"
    assert file_server.gets == ["/pretrain/tiny.pth"]  # fetched once, by the driver: both workers read the node cache

    keys = cluster.list_keys(f"ckpt/{name}/")
    checkpoints = sorted({key.split("/")[2] for key in keys if re.fullmatch(r"checkpoint_\d+", key.split("/")[2])})
    assert checkpoints == ["checkpoint_0000010", "checkpoint_0000020"], keys
    for checkpoint in checkpoints:
        files = {key.rsplit("/", 1)[1] for key in keys if key.startswith(f"ckpt/{name}/{checkpoint}/")}
        assert CHECKPOINT_FILES <= files, (checkpoint, files)
    meta = cluster.read_json(f"ckpt/{name}/checkpoint_0000020/meta.json")
    assert meta["iteration"] == 20 and meta["mlflow_run_id"] == summary["mlflow_run_id"]
    assert 0.0 <= meta["metrics"]["val/mIoU"] <= 100.0
    assert summary["metrics"]["iteration"] == 20
    saved = yaml.safe_load(cluster.s3.client().get_object(Bucket=TEST_BUCKET, Key=f"ckpt/{name}/checkpoint_0000020/"
                                                                          f"config.yaml")["Body"].read())
    assert class_names(saved) == names and saved["model"]["num_classes"] == 5  # what eval and predict read

    client = mlflow_server.client()
    run = client.get_run(summary["mlflow_run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["optim.lr"] == "0.001" and params["trainer.max_iters"] == "20"
    assert params["data.crop_size"] == "64" and params["storage.uri"] == f"s3://{TEST_BUCKET}/ckpt"
    assert tags["head"] and tags["backbone"] and tags["crop"] == "64"
    assert tags["dataset"] == "synthetic-custom" and tags["device"] == "cpux2"  # the dataset folder's name
    assert params["data.classes"] == str(list(names)) and params["data.reduce_zero_label"] == "False"
    assert tags["git_commit"] not in ("", "unknown")
    assert tags["checkpoint_uri"] == f"s3://{TEST_BUCKET}/ckpt/{name}"
    assert tags["knetlab.pretrained"] == file_server.url("pretrain/tiny.pth")
    assert tags["knetlab.pretrained_sha256"] == digest and params["model.pretrained_sha256"] == digest[:8]
    assert re.fullmatch(r"\d+ tensors loaded \(timm/torchvision ResNet layout\), 0 missing, 2 unused \(fc.weight, "
                        r"fc.bias\)", tags["knetlab.pretrained_keys"])
    # the table's Mem (the larger worker's training peak memory) and the precision it was measured in (this run skips
    # the fps benchmark, trainer.bench_images=0: the sweep and det e2e tests check bench/fps)
    assert tags["bench/precision"] == "fp32"
    assert run.data.metrics["bench/mem_gb"] > 0
    uri = mlflow_server.uri
    assert steps(uri, run.info.run_id, "train/loss") == [5, 10, 15, 20]
    assert steps(uri, run.info.run_id, "train/lr") == [5, 10, 15, 20]
    assert steps(uri, run.info.run_id, "val/mIoU") == [10, 20]
    per_class = [key for key in run.data.metrics if key.startswith("val/IoU/")]
    assert per_class and {key.removeprefix("val/IoU/") for key in per_class} <= set(names), sorted(run.data.metrics)
    assert steps(uri, run.info.run_id, per_class[0]) == [10, 20]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert any(path.endswith(".yaml") for path in artifacts), artifacts
    for iteration in (10, 20):
        folder = f"eval/iter_{iteration:07d}"
        files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, folder)}
        assert {"per_class_iou.csv", "confusion_matrix.png", "overlay_0.png"} <= files, (folder, files)
    csv = Path(client.download_artifacts(run.info.run_id, "eval/iter_0000020/per_class_iou.csv", str(tmp_path)))
    assert [line.split(",")[1] for line in csv.read_text().splitlines()[1:]] == list(names)


# -- (b): a killed worker restarts from the last checkpoint --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_killed_worker_restarts_from_last_checkpoint(cluster: Cluster, tmp_path: Path, mlflow_server: MlflowServer,
                                                     capfd: pytest.CaptureFixture) -> None:
    from knetlab.platform.trainer import run_training

    name = "kill-run"
    for old in cluster.pid_dir.glob("*.pid"):
        old.unlink()
    cfg = smoke_config(cluster, tmp_path, name, "trainer.max_iters=30", "trainer.max_failures=2",
                       tracking=mlflow_server.uri)
    run_dir = tmp_path / "ckpt" / name
    killed: dict[str, int] = {}

    def registered_checkpoints() -> list[str]:
        # A checkpoint counts once the controller has it (every rank reported): its snapshot file names it. A kill
        # between rank 0's files appearing and rank 1's report would rightly restart from scratch.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        text = snapshot.read_text() if snapshot.is_file() else ""
        return sorted(set(re.findall(r"checkpoint_\d{7}", text)))

    def kill_rank1_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not registered_checkpoints():
            time.sleep(0.1)
        pid_file = cluster.pid_dir / "rank1.pid"
        if registered_checkpoints() and pid_file.is_file():
            killed["pid"] = int(pid_file.read_text())
            killed["after"] = int(registered_checkpoints()[-1].split("_")[1])
            os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank1_after_first_checkpoint, daemon=True)
    killer.start()
    summary = run_training(cfg)
    killer.join(timeout=5)

    assert killed.get("after") == 10, f"rank 1 was not killed after the first checkpoint: {killed}"
    assert_worker_output(capfd, "resumed from the checkpoint at iteration 10")
    assert int((cluster.pid_dir / "rank1.pid").read_text()) != killed["pid"], "no new worker group started"
    meta = json.loads((run_dir / "checkpoint_0000030" / "meta.json").read_text())
    assert meta["iteration"] == 30
    uri, run_id = mlflow_server.uri, summary["mlflow_run_id"]
    assert steps(uri, run_id, "train/loss") == [5, 10, 15, 20, 25, 30]
    assert steps(uri, run_id, "val/mIoU") == [10, 20, 30]


# -- (h): the MLflow server down during training ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_mlflow_outage_spools_and_delivers_every_step_once(cluster: Cluster, tmp_path: Path,
                                                           mlflow_server: MlflowServer) -> None:
    from knetlab.platform.trainer import run_training

    name = "mlflow-outage"
    cfg = smoke_config(cluster, tmp_path, name, "trainer.max_iters=30", "trainer.log_interval=2",
                       tracking=mlflow_server.uri)
    state: dict[str, float] = {}

    def outage() -> None:
        client = mlflow_server.client()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()
                                       if e.name == f"e2e-{name}"], max_results=1)
            if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                break
            time.sleep(0.2)
        else:
            return
        state["stopped"] = time.monotonic()
        mlflow_server.stop()
        # Back once the run has checkpointed at iteration 10 of 30: an outage of steps 2-10 (and of the checkpoint's
        # validation) that ends while the run is still training, however slow the machine is.
        checkpoint = tmp_path / "ckpt" / name / "checkpoint_0000010" / "meta.json"
        while time.monotonic() < deadline and not checkpoint.is_file():
            time.sleep(0.2)
        mlflow_server.start()
        state["started"] = time.monotonic()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        summary = run_training(cfg)
    finally:
        thread.join(timeout=120)
        mlflow_server.start()  # for the tests after this one, whatever happened
    state["finished"] = time.monotonic()
    assert "stopped" in state, "the server was never stopped: no metric arrived"
    uri, run_id = mlflow_server.uri, summary["mlflow_run_id"]
    assert steps(uri, run_id, "train/loss") == list(range(2, 31, 2))
    assert steps(uri, run_id, "val/mIoU") == [10, 20, 30]
    client = mlflow_server.client()
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "eval/iter_0000030")}
    assert "per_class_iou.csv" in files
    assert not (tmp_path / "mlflow-spool" / name / "spool.jsonl").exists(), "records left in the spool"


# -- (i): bad input fails before any worker starts, in one line ------------------------------------------------------
def knetlab_train(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [str(KNETLAB), "train", str(SMOKE), "trainer.max_iters=2", "schedule.milestones=[]",
               f"tracking.uri={tracking_db(tmp_path)}",
               *overrides]
    environment = {**os.environ, "KNETLAB_RUNS_DIR": str(tmp_path / "runs"), **(env or {})}
    for key in ("KNETLAB_DEBUG", "RAY_ADDRESS"):
        environment.pop(key, None)
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment, cwd=tmp_path)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """Exit code `code` (2 bad input, 1 storage/runtime: knetlab.platform.cli), one error line holding `fragments`."""
    assert result.returncode == code, (result.returncode, result.stdout + result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("knetlab: error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Started a local Ray instance" not in result.stdout + result.stderr, "Ray started before the check"


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    root = tmp_path_factory.mktemp("data") / "ade"
    generate_synthetic_ade20k(root, num_train=8, num_val=2)
    return root


def test_missing_dataset_is_one_line_error(tmp_path: Path) -> None:
    result = knetlab_train(tmp_path, "data.root=/nonexistent", "data.synthesize=false")
    assert_one_line_error(result, 2, "/nonexistent")


def test_unreachable_bucket_is_one_line_error(tmp_path: Path, small_dataset: Path) -> None:
    closed = free_port()
    result = knetlab_train(tmp_path, f"data.root={small_dataset}", "data.synthesize=false",
                           f"storage.uri=s3://{TEST_BUCKET}/x",
                           env={**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"})
    assert_one_line_error(result, 1, f"s3://{TEST_BUCKET}/x", "not reachable", f"127.0.0.1:{closed}")


def test_wrong_bucket_is_one_line_error(tmp_path: Path, small_dataset: Path, s3_server) -> None:
    result = knetlab_train(tmp_path, f"data.root={small_dataset}", "data.synthesize=false",
                           "storage.uri=s3://no-such-bucket/x")
    assert_one_line_error(result, 1, "no-such-bucket", "does not exist")


def test_table_row_with_unreachable_weights_fails_before_ray_naming_them(tmp_path: Path, small_dataset: Path) -> None:
    """A table row starts from its reference ImageNet weights; when they cannot be fetched `knetlab train` stops in
    the driver, before Ray starts, in one line naming them and how to supply a copy (exit 2: bad input)."""
    row = REPO / "experiments" / "ade20k" / "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512.yaml"
    url = f"http://127.0.0.1:{free_port()}/pretrain/third_party/resnet50_v1c-2cccc1ad.pth"  # nothing listens there
    command = [str(KNETLAB), "train", str(row), f"data.root={small_dataset}", f"storage.uri={tmp_path / 'ckpt'}",
               f"tracking.uri=sqlite:///{tmp_path}/m.db", f"model.pretrained={url}",
               f"model.cache_dir={tmp_path / 'cache'}"]
    environment = {k: v for k, v in os.environ.items() if k not in ("KNETLAB_DEBUG", "RAY_ADDRESS")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment, cwd=tmp_path)
    assert_one_line_error(result, 2, f"model.pretrained={url}: cannot be fetched (",
                          "model.pretrained=/path/to/resnet50_v1c-2cccc1ad.pth (a local copy)",
                          "model.pretrained=s3://BUCKET/PREFIX/resnet50_v1c-2cccc1ad.pth (an S3 mirror",
                          "model.pretrained=none")
    assert not (tmp_path / "m.db").exists(), "an MLflow run was created before the check"


def test_local_storage_on_a_multi_node_cluster_is_refused() -> None:
    from knetlab.platform.storage import StorageError, require_shared_storage

    require_shared_storage("runs/x", 1)
    require_shared_storage("s3://bucket/x", 2)
    with pytest.raises(StorageError) as error:
        require_shared_storage("runs/x", 2)
    message = str(error.value)
    assert "\n" not in message and "storage.uri=runs/x" in message and "s3://" in message and "2 nodes" in message
