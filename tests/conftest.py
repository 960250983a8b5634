"""Shared test fixtures: real servers on loopback (moto's S3 server, an `mlflow server` process), started and
stopped by the tests themselves, on free ports of 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from knetlab.platform.trainer import LOCAL_RAY_ENV

# Every Ray cluster a test starts is local: the same environment as `knetlab train` gives a local cluster (loopback
# only, no token auth, no usage stats, fast Train health checks), plus test-only settings. OMP_WAIT_POLICY=PASSIVE:
# torch's OpenMP threads (libgomp) otherwise spin after every parallel region, which on 2 cores shared by 3 xdist
# workers burns the CPU the others need (the tests without `slow`: 392-403 CPU-s spinning, 325-341 passive).
for _key, _value in {**LOCAL_RAY_ENV, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE",
                     "GIT_PYTHON_REFRESH": "quiet"}.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_BUCKET = "knetlab-test"
# moto accepts any credentials; these are test values, not secrets.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process exited with code {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except Exception as error:
            last_error = error
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s: {last_error}")


@dataclass
class S3Server:
    """A moto S3 server on loopback; `endpoint_url` is what boto3/pyarrow/Ray workers use."""

    endpoint_url: str
    bucket: str
    port: int
    _server: object = field(repr=False)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_credentials())

    def list_keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys


def processes_naming(paths: list[Path]) -> list[psutil.Process]:
    """Processes (not this one) whose command line names one of `paths`: a test's own temp dirs, so only what the
    test started (Ray re-parents its workers, so a process tree alone misses some)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(str(p) in cmdline for p in paths):
            found.append(proc)
    return found


def stop_processes(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM, `timeout` seconds to exit, then SIGKILL for what is left."""
    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A fresh moto S3 server with an empty `knetlab-test` bucket; the AWS environment points at it for the test
    (and for any Ray cluster the test starts afterwards, whose workers inherit the environment)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its backends in process-wide state shared by every server started in this process: without a reset,
    # a test would see the buckets and objects of the tests before it.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    s3 = S3Server(endpoint_url=endpoint, bucket=TEST_BUCKET, port=port, _server=server)
    s3.client().create_bucket(Bucket=TEST_BUCKET)
    try:
        yield s3
    finally:
        server.stop()


_TRACKING_TEMPLATE: list[Path] = []  # where tracking_db keeps its template database this session


@pytest.fixture(scope="session", autouse=True)
def _tracking_template_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    _TRACKING_TEMPLATE.append(tmp_path_factory.mktemp("tracking-template") / "mlflow.db")


def tracking_db(directory: Path) -> str:
    """A `sqlite:///directory/mlflow.db` tracking URI whose tables exist already. Creating MLflow's tables (its schema
    migrations) costs seconds of CPU in the first process that opens a new database; copying a database made once
    per session does not."""
    template = _TRACKING_TEMPLATE[-1]
    if not template.exists():
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()  # creates the tables
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "mlflow.db"
    if not target.exists():
        shutil.copyfile(template, target)
    return f"sqlite:///{target}"


@dataclass
class MlflowServer:
    """An `mlflow server` process on loopback with a sqlite backend; `stop()`/`start()` simulate an outage while
    keeping its data (same database, same port)."""

    uri: str
    port: int
    root: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        wait_for_http(f"{self.uri}/health", timeout=90, process=self.process)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The server runs in its own session; stop its whole process group (uvicorn workers included).
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real `mlflow server` for the session. Tests that stop it must start it again before they end."""
    port = free_port()
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", port=port, root=tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()



@dataclass
class FileServer:
    """A real HTTP server on loopback serving the files under `root` (http://127.0.0.1:PORT/<path under root>); `gets`
    lists the paths it was asked for, in order."""

    root: Path
    port: int
    gets: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()
    server_state = FileServer(root=root, port=0)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            server_state.gets.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:  # quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    server_state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- scheduling: `make test` runs the suite on pytest-xdist workers (`--dist loadgroup`) -------------------------------
# Ray tests of a module that shares one in-process Ray cluster between its tests (a module-scoped fixture) stay on one
# worker; every other test goes wherever a worker is free. The longest end-to-end tests are handed out first so that
# the short ones fill the gaps instead of waiting behind a long tail.
SHARED_RAY_MODULES = {"test_train_e2e", "test_train_det_e2e", "test_preflight"}
# A fork of a test process that has run Ray in it can crash the child ("malloc(): unaligned fastbin chunk detected" in a
# DataLoader worker of test_data_bench after test_preflight's in-process cluster, 2026-12-03): the tests that fork
# DataLoader workers from the test process (marked `forks`, a few seconds in all) go first, before any Ray test.
# Modules by their measured time in the suite, longest first (README, "Tests"); the others keep collection order.
LONGEST_FIRST = {name: rank for rank, name in enumerate((
    "test_sweep_e2e", "test_train_resume", "test_train_e2e", "test_train_det_e2e", "test_concurrent_runs",
    "test_job_submit", "test_multinode", "test_preflight", "test_train_mlflow", "test_secrets", "test_train_sync"))}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if item.module is not None else ""
        if module in SHARED_RAY_MODULES and item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group(module))
    # stable: the forking tests, then in each class (ray and slow, slow, the rest) the modules measured longest first
    items.sort(key=lambda item: (item.get_closest_marker("forks") is None, item.get_closest_marker("ray") is None,
                                 item.get_closest_marker("slow") is None,
                                 LONGEST_FIRST.get(item.module.__name__ if item.module else "", len(LONGEST_FIRST))))
