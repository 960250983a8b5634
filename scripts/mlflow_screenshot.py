"""The MLflow runs view of a sweep, as a user meets it, as a PNG (docs/mlflow-runs.png): starts a real `mlflow server`
on 127.0.0.1, runs a tiny `knetlab sweep` against it, then photographs the sweep's runs view (parent run expanded)
with headless Chromium (Debian's `chromium` package: `apt-get install -y chromium`), driven over its DevTools pipe.
Starts Ray: run it under the lock the tests use.

    flock /tmp/knetlab-ray.lock .venv/bin/python scripts/mlflow_screenshot.py [--out docs/mlflow-runs.png]
    .venv/bin/python scripts/mlflow_screenshot.py --skip-sweep --keep DIR   # photograph again, the sweep kept in DIR
"""

from __future__ import annotations

import argparse
import base64
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


class DevTools:
    """Headless Chromium driven over its DevTools pipe (`--remote-debugging-pipe`: JSON commands on fd 3, replies on
    fd 4, each ended by a NUL byte), so the standard library is enough to click and take the picture."""

    def __init__(self, browser: str, size: tuple[int, int]) -> None:
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before the fds not in pass_fds are closed
            read_end, write_end = os.dup(to_browser), os.dup(from_browser)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        # --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI); the page is our own server's.
        self.process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--window-size={size[0]},{size[1]}", "about:blank"],
            preexec_fn=as_fds_3_and_4, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._last_id, self.session = b"", 0, None

    def send(self, method: str, params: dict | None = None) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise SystemExit(f"chromium closed its DevTools pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise SystemExit(f"chromium: {method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> object:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return reply.get("result", {}).get("value")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# The runs view as a user tidies it: the assistant panel closed, the sweep's parent run expanded to show its trials.
CLOSE_ASSISTANT = '[data-component-id="mlflow.assistant.chat_panel.close"]'
EXPAND_PARENT = '[data-component-id$="runnamecellrenderer.tsx_46"]'


def photograph(url: str, out: Path, size: tuple[int, int], timeout_s: float = 120) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    chrome = DevTools(browser, size)
    try:
        page = next(t for t in chrome.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        chrome.session = chrome.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})[
            "sessionId"]
        chrome.send("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1],
                                                            "deviceScaleFactor": 1, "mobile": False})
        chrome.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout_s
        while not chrome.evaluate("!!document.body && document.body.innerText.includes('matching runs')"):
            if time.monotonic() > deadline:
                raise SystemExit(f"the runs table did not appear within {timeout_s:.0f} s at {url}")
            time.sleep(0.5)
        for selector in (CLOSE_ASSISTANT, EXPAND_PARENT):  # one after the other: each click re-renders the table
            time.sleep(2)
            chrome.evaluate(f"document.querySelectorAll('{selector}').forEach(b => b.click())")
        time.sleep(3)
        shot = chrome.send("Page.captureScreenshot", {"format": "png"})
    finally:
        chrome.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))
    print(f"[screenshot] {url} -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow-runs.png")
    parser.add_argument("--keep", type=Path, help="folder for the server's database, checkpoints and data (kept)")
    parser.add_argument("--skip-sweep", action="store_true", help="photograph the sweep already in --keep")
    parser.add_argument("--size", default="1600,540", help="browser window, width,height")
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
        # workflowType: MLflow 3.17's UI shows an experiment in its global GenAI / Model training view (GenAI until a
        # user switches); knetlab prints its links with this parameter too (mlflow_context.ui_link).
        url = f"{uri}/#/experiments/{experiment_id(uri, EXPERIMENT)}/runs?workflowType=machine_learning"
        width, height = (int(v) for v in args.size.split(","))
        photograph(url, args.out, (width, height))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
