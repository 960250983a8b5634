"""The MLflow runs view of a sweep, as a user meets it, as a PNG (docs/mlflow-runs.png): starts a real `mlflow server`
on 127.0.0.1, runs a tiny `knetlab sweep` against it, then photographs the sweep's experiment with headless Chromium
(Debian's `chromium` package: `apt-get install -y chromium`). Starts Ray: run it under the lock the tests use.

    flock /tmp/knetlab-ray.lock .venv/bin/python scripts/mlflow_screenshot.py [--out docs/mlflow-runs.png]
    .venv/bin/python scripts/mlflow_screenshot.py --skip-sweep --keep DIR   # photograph again, the sweep kept in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "experiments" / "sweeps" / "smoke.yaml"
EXPERIMENT = "knetlab-sweep-smoke"
# Small enough for a laptop's CPU in a few minutes; the sweep file's 3 configurations x 2 seeds stay as they are.
TINY = ["trainer.max_iters=20", "trainer.eval_interval=10", "trainer.checkpoint_interval=10",
        "trainer.log_interval=5", "schedule.warmup_iters=5", "schedule.milestones=[15]", "data.val_max_images=4",
        "trainer.bench_images=2", "tracking.system_metrics_interval=1"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not start; see {root / 'server.log'}") from None
            time.sleep(1)


def experiment_id(uri: str, name: str) -> str:
    url = f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)["experiment"]["experiment_id"]


def photograph(url: str, out: Path, size: str, wait_ms: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    # --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI); the page is our own server's.
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"[screenshot] {url} -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow-runs.png")
    parser.add_argument("--keep", type=Path, help="folder for the server's database, checkpoints and data (kept)")
    parser.add_argument("--skip-sweep", action="store_true", help="photograph the sweep already in --keep")
    parser.add_argument("--size", default="1600,900", help="browser window, width,height")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to load")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="knetlab-screenshot-"))
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    try:
        if not args.skip_sweep:
            env = dict(os.environ, MLFLOW_TRACKING_URI=uri, KNETLAB_RUNS_DIR=str(root / "runs"))
            env.pop("RAY_ADDRESS", None)
            command = [str(Path(sys.executable).parent / "knetlab"), "sweep", str(SWEEP), *TINY,
                       f"storage.uri={root / 'checkpoints'}", f"data.root={root / 'data' / 'synthetic-ade20k'}"]
            print("[screenshot]", " ".join(command), flush=True)
            subprocess.run(command, cwd=REPO, env=env, check=True)
        photograph(f"{uri}/#/experiments/{experiment_id(uri, EXPERIMENT)}/runs", args.out, args.size, args.wait_ms)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
