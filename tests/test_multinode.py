"""Multi-node acceptance (issue 6): a Ray cluster of two nodes on this machine (a head and a second node, loopback
only), `knetlab train` as a separate driver process connected to it through RAY_ADDRESS, as a user would run it.

- A 2-worker run with `trainer.placement_strategy=STRICT_SPREAD` puts one Ray Train worker on each node (read from
  Ray's own state: the RayTrainWorker actors' node ids, the placement group's bundles, and the workers' PIDs),
  checkpoints to S3 (a moto server) and logs to an `mlflow server` over HTTP.
- The same run with local storage is refused: one `knetlab: error:` line, non-zero exit, nothing trained.

Both nodes get the S3 environment: the workers (which upload the checkpoints) are started by the raylets and inherit
it. Everything started here is stopped at the end, only these nodes' processes, never by `ray stop`.
Run under the shared lock: `flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_multinode.py`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    REPO_ROOT,
    TEST_BUCKET,
    MlflowServer,
    S3Server,
    free_port,
    processes_naming,
    stop_processes,
    wait_for_http,
)

from knetlab.platform.trainer import LOCAL_RAY_ENV

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BIN = Path(sys.executable).parent
SMOKE = REPO_ROOT / "experiments" / "smoke.yaml"
CHECKPOINT_FILES = {"model.pt", "train_state.pt", "meta.json", "config.yaml", "rng_rank0.pt", "rng_rank1.pt"}


@dataclass
class TwoNodeCluster:
    address: str  # the GCS address, what RAY_ADDRESS holds
    dashboard_url: str  # the State API
    temp_dirs: list[Path]  # one per node
    pid_dir: Path  # KNETLAB_WORKER_PID_DIR of the workers


def _alive_nodes(dashboard_url: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=dashboard_url, timeout=10) if n.state == "ALIVE"]


@pytest.fixture
def two_node_cluster(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoNodeCluster]:
    """A head (dashboard on loopback) and a second node of one Ray cluster on this machine, 2 CPUs each.

    Started with Ray's own `ray.cluster_utils.Cluster` rather than two `ray start` processes: `ray start --address`
    refuses to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and without that setting Ray turns the
    address 127.0.0.1 into the machine's routable address, so a second node cannot join a loopback-only head that
    way. Both nodes run with this process's environment (Ray's local settings from conftest, the S3 environment of
    `s3_server`, the workers' PID folder): the workers, which upload the checkpoints, inherit it. Each node has its
    own short temp dir (Ray's unix socket paths must stay below 108 bytes); RAY_TMPDIR keeps Ray's "current
    cluster" address file in there too, away from other Ray clusters of the machine."""
    from ray.cluster_utils import Cluster

    pid_dir = tmp_path / "pids"
    temp_dirs = [Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")) for prefix in ("kmnh", "kmnw")]
    (temp_dirs[0] / "ray").mkdir()  # where Ray writes the address file under RAY_TMPDIR
    for key, value in {**LOCAL_RAY_ENV, "OMP_NUM_THREADS": "1", "KNETLAB_WORKER_PID_DIR": str(pid_dir),
                       "RAY_TMPDIR": str(temp_dirs[0])}.items():
        monkeypatch.setenv(key, value)
    for key in ("RAY_ADDRESS", "KNETLAB_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    assert os.environ.get("AWS_ENDPOINT_URL") == s3_server.endpoint_url
    dashboard_port = free_port()
    # 2 CPUs a node: room for both workers on one node, so only the placement strategy spreads them.
    common = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "object_store_memory": 100 * 1024 * 1024,
              "min_worker_port": 0, "max_worker_port": 0}
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            **common, "temp_dir": str(temp_dirs[0]), "gcs_server_port": free_port(),
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
        })
        cluster.add_node(**common, temp_dir=str(temp_dirs[1]), metrics_export_port=free_port())
        result = TwoNodeCluster(address=cluster.address, dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                                temp_dirs=temp_dirs, pid_dir=pid_dir)
        wait_for_http(f"{result.dashboard_url}/api/version", timeout=120)
        deadline = time.monotonic() + 120
        while len(_alive_nodes(result.dashboard_url)) < 2:
            assert time.monotonic() < deadline, "the second node did not join within 120 s"
            time.sleep(0.5)
        yield result
    finally:
        if cluster is not None:
            cluster.shutdown()  # kills the processes of these two nodes only (never `ray stop`)
        stop_processes(processes_naming(temp_dirs))  # what outlived the cluster's shutdown
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


class PlacementWatcher:
    """Polls Ray's State API while the run goes on: the alive RayTrainWorker actors (node id, pid) and the node ids
    of the bundles of every created placement group."""

    def __init__(self, dashboard_url: str) -> None:
        self.dashboard_url = dashboard_url
        self.workers: dict[str, tuple[str, int]] = {}  # actor id -> (node id, pid)
        self.bundle_nodes: dict[str, list[str]] = {}  # placement group id -> its bundles' node ids
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PlacementWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        from ray.util.state import list_actors, list_placement_groups

        while not self._stop.wait(0.5):
            try:
                for actor in list_actors(address=self.dashboard_url, timeout=10,
                                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
                    if actor.node_id and actor.pid:
                        self.workers[actor.actor_id] = (actor.node_id, actor.pid)
                for group in list_placement_groups(address=self.dashboard_url, timeout=10, detail=True,
                                                   filters=[("state", "=", "CREATED")]):
                    nodes = [bundle.get("node_id") for bundle in group.bundles or []]
                    if nodes and all(nodes):
                        self.bundle_nodes[group.placement_group_id] = nodes
            except Exception as error:  # a busy dashboard on 2 cores; keep polling
                self.errors.append(f"{type(error).__name__}: {error}")


def knetlab_train(cluster: TwoNodeCluster, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`knetlab train experiments/smoke.yaml` as a driver of the two-node cluster (RAY_ADDRESS), with small settings."""
    command = [
        str(BIN / "knetlab"), "train", str(SMOKE),
        f"data.root={tmp_path / 'data'}", "data.synthesize=false", "data.crop_size=64", "data.batch_size=4",
        "data.val_max_images=2",
        "trainer.num_workers=2", "trainer.cpus_per_worker=1", "trainer.placement_strategy=STRICT_SPREAD",
        "trainer.max_iters=20", "trainer.eval_interval=10", "trainer.checkpoint_interval=10",
        "trainer.log_interval=5", "schedule.warmup_iters=5", "schedule.milestones=[15]",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "KNETLAB_RUNS_DIR": str(tmp_path / "runs"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("KNETLAB_WORKER_PID_DIR", None)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:  # only on a timeout or an error in the test: the driver's whole session
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_node_cluster_spreads_the_workers_and_needs_shared_storage(
    two_node_cluster: TwoNodeCluster, s3_server: S3Server, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    cluster = two_node_cluster
    generate_synthetic_ade20k(tmp_path / "data", num_train=16, num_val=2)
    nodes = _alive_nodes(cluster.dashboard_url)
    node_ids = {n.node_id for n in nodes}
    assert len(node_ids) == 2 and sorted(n.is_head_node for n in nodes) == [False, True], nodes
    import ray

    from knetlab.platform.storage import cluster_node_count

    ray.init(address=cluster.address)
    try:
        assert cluster_node_count() == 2  # what the shared-storage check below counts
    finally:
        ray.shutdown()
    tag = uuid.uuid4().hex[:8]

    # -- local storage on a 2-node cluster: refused after connecting, before any worker or MLflow run starts --------
    local = tmp_path / "local-ckpt"
    refused = knetlab_train(cluster, tmp_path, f"storage.uri={local}", f"tracking.uri={mlflow_server.uri}",
                            f"tracking.experiment=multinode-refused-{tag}")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "Traceback" not in refused.stderr, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("knetlab: error: ")]
    assert errors == [
        f"knetlab: error: storage.uri={local} is a local path but the Ray cluster has 2 nodes: use shared storage "
        "(s3://bucket/prefix) so any node can restore checkpoints"
    ], refused.stderr
    assert "[knetlab] run " not in refused.stdout, "the refused run started training"
    assert not list(local.rglob("checkpoint_*"))
    assert mlflow_server.client().get_experiment_by_name(f"multinode-refused-{tag}") is None

    # -- the same run with S3 storage: one worker per node, checkpoints in the bucket, metrics in MLflow ------------
    name, experiment = f"multinode-{tag}", f"multinode-{tag}"
    started = time.monotonic()
    with PlacementWatcher(cluster.dashboard_url) as watcher:
        result = knetlab_train(cluster, tmp_path, f"storage.uri=s3://{TEST_BUCKET}/multinode",
                               f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={experiment}",
                               f"tracking.run_name={name}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert f"[knetlab] finished {name}" in result.stdout, output[-4000:]
    print(f"two-node run: {time.monotonic() - started:.1f} s; workers {watcher.workers}; "
          f"bundles {watcher.bundle_nodes}; nodes {node_ids}")

    # Ray's placement: the two RayTrainWorker actors ran on the two different nodes ...
    assert len(watcher.workers) == 2, (watcher.workers, watcher.errors[-5:])
    worker_nodes = [node for node, _ in watcher.workers.values()]
    assert set(worker_nodes) == node_ids, (watcher.workers, node_ids)
    # ... in a placement group whose two bundles are on the two nodes (STRICT_SPREAD) ...
    two_bundle_groups = [nodes for nodes in watcher.bundle_nodes.values() if len(nodes) == 2]
    assert two_bundle_groups and all(set(nodes) == node_ids for nodes in two_bundle_groups), watcher.bundle_nodes
    # ... and the training processes of rank 0 and rank 1 are those actors' processes.
    rank_pids = {int((cluster.pid_dir / f"rank{rank}.pid").read_text()) for rank in (0, 1)}
    assert rank_pids == {pid for _, pid in watcher.workers.values()}, (rank_pids, watcher.workers)

    # Checkpoints of both evaluations landed in the bucket, with both ranks' RNG states.
    keys = s3_server.list_keys(f"multinode/{name}/")
    checkpoints = sorted({key.split("/")[2] for key in keys if re.fullmatch(r"checkpoint_\d+", key.split("/")[2])})
    assert checkpoints == ["checkpoint_0000010", "checkpoint_0000020"], keys
    for checkpoint in checkpoints:
        files = {key.rsplit("/", 1)[1] for key in keys if key.startswith(f"multinode/{name}/{checkpoint}/")}
        assert CHECKPOINT_FILES <= files, (checkpoint, files)

    # The metrics reached the MLflow server over HTTP, one value per step.
    client = mlflow_server.client()
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, runs
    run = runs[0]
    assert run.data.tags["checkpoint_uri"] == f"s3://{TEST_BUCKET}/multinode/{name}"
    assert run.data.params["trainer.placement_strategy"] == "STRICT_SPREAD"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [5, 10, 15, 20]
    val = client.get_metric_history(run.info.run_id, "val/mIoU")
    assert sorted(m.step for m in val) == [10, 20] and all(0.0 <= m.value <= 100.0 for m in val)
