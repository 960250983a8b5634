"""The one-shot GPU check that `scripts/gpu_check.sh` runs; on one GPU it takes at most 8 minutes.

(a) Every ADE20K table row, and the COCO panoptic row knet-s3_r50_fpn_1x_coco-panoptic, measured by `knetlab bench`'s
    own code (`benchmark_experiment`): inference fps at the test scale, then the training step time and peak memory at
    the real crop and batch 2. Each is measured in fp32 (TF32 as trainer.tf32 says) and in bf16.
(b) A 200-iteration Ray Train run of KNet+FCN R-50-D8 at the real crop (`knetlab train`, bf16 AMP) on synthetic data.
    Its checkpoints go to a local S3-compatible server (moto) and its metrics to an `mlflow server`. The script starts
    both on 127.0.0.1. It then checks that the loss fell, that no logged value is NaN or inf, that every checkpoint is
    in the bucket, and that the table's figures and bench/precision were logged.
(c) The table beside the seed table's Mem and fps columns (V100, FP32, from each row's experiment file). It is printed
    and written into docs/performance.md between the gpu_check markers.

`--cpu` runs the same steps on the CPU with the tiny models, tiny sizes and a few iterations. The test suite runs it
(tests/test_gpu_check.py) so that the script cannot rot. It exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = sorted((REPO / "experiments" / "ade20k").glob("knet-s3_*.yaml"))
PANOPTIC_ROW = "knet-s3_r50_fpn_1x_coco-panoptic"
TRAIN_ROW = REPO / "experiments" / "ade20k" / "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512.yaml"
BUCKET = "knetlab-gpu-check"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "gpu-check", "AWS_SECRET_ACCESS_KEY": "gpu-check", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1"}  # moto accepts any credentials


STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - STARTED:4.0f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def seed_figures(path: Path) -> tuple[float | None, float | None]:
    """(Mem GB, fps) of the seed table (V100, FP32) from the experiment file's header comment."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    match = re.search(r"([\d.]+) GB, ([\d.]+) fps on V100", header)
    return (float(match[1]), float(match[2])) if match else (None, None)


def bench_rows(cpu: bool) -> list[tuple[str, Path, list[str]]]:
    """(name, experiment file, overrides) of each row to benchmark."""
    if cpu:
        return [("tiny", REPO / "experiments" / "smoke.yaml", ["data.batch_size=2"]),
                ("tiny-panoptic", REPO / "experiments" / "smoke-panoptic.yaml", [])]
    coco = [f"model.name={PANOPTIC_ROW}", "data.scale=[1333,800]", "eval.test_scale=[1333,800]", "optim.lr=1e-4"]
    return [(path.stem, path, []) for path in ROWS] + [
        (PANOPTIC_ROW, REPO / "experiments" / "smoke-panoptic.yaml", coco)]


# -- (a) the benchmark of every row ----------------------------------------------------------------------------------
# (label, config overrides, precision): every row in IEEE fp32 (the seed table's V100 precision) and bf16; the FCN row
# (tiny with --cpu) also with the fast paths a benchmark can show (cudnn.benchmark stays off in every benchmark).
PRECISIONS = [("fp32", ["trainer.tf32=false"], "fp32"), ("bf16", [], "bf16")]
FAST_PATHS = [("tf32", ["trainer.tf32=true"], "fp32"), ("bf16 + channels_last", ["trainer.channels_last=true"], "bf16")]


def measure(cfg, variant: tuple[str, list[str], str], args: argparse.Namespace) -> dict:
    from knetlab.platform.bench_experiment import benchmark_experiment
    from knetlab.platform.config import merge_overrides

    label, overrides, precision = variant
    started = time.perf_counter()
    result = benchmark_experiment(merge_overrides(cfg, overrides), {
        "warmup": 1 if args.cpu else 3, "timed": args.images, "train_steps": 1 if args.cpu else 5,
        "device": "cpu" if args.cpu else "cuda", "image_size": None, "quiet": True, "precision": precision,
        "restore_weights": False})  # the weights' values do not matter for timing
    say(f"{cfg.model.name} {label} ({result['precision']}): {result['bench/fps']:.2f} fps, train step "
        f"{result['bench/step_s']:.3f} s, {result['bench/mem_gb']:.2f} GiB ({time.perf_counter() - started:.0f} s)")
    return result


def run_benchmarks(args: argparse.Namespace) -> list[dict]:
    import torch

    from knetlab.platform.config import load_config

    if args.cpu:
        torch.set_num_threads(1)  # as a Ray worker with one CPU: two threads on two busy cores run 10x slower
    rows = []
    for name, path, overrides in bench_rows(args.cpu):
        if args.rows and name not in args.rows:
            continue
        cfg = load_config(path, [*overrides, f"trainer.use_gpu={not args.cpu}"])
        fast = name in ("tiny", TRAIN_ROW.stem)
        rows.append({"name": name, "seed": seed_figures(path),
                     **{label: measure(cfg, (label, o, p), args) for label, o, p in PRECISIONS + FAST_PATHS * fast}})
        gc.collect()
        if not args.cpu:
            torch.cuda.empty_cache()
    return rows


# -- (b) the training run --------------------------------------------------------------------------------------------
def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "mlflow-server.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gpu_check: the mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"gpu_check: {url} did not answer within {timeout:.0f} s")


def training_overrides(args: argparse.Namespace, data_root: Path, tracking_uri: str, run_name: str) -> list[str]:
    """The FCN row at its real crop (tiny model and crop with --cpu) for args.iters iterations: a short warm-up and
    no LR decay, so that the loss visibly falls within the run."""
    iters = args.iters
    cpus = max(2, min(8, (os.cpu_count() or 4) - 2))
    common = [f"data.root={data_root}", "data.synthesize=false", "data.val_max_images=2", "trainer.num_workers=1",
              f"trainer.max_iters={iters}", f"trainer.eval_interval={iters}",
              f"trainer.checkpoint_interval={iters // 2}",
              f"trainer.log_interval={max(1, iters // (5 if args.cpu else 20))}",
              f"schedule.warmup_iters={max(1, iters // 10)}",
              "schedule.milestones=[]", f"storage.uri=s3://{BUCKET}/checkpoints", f"tracking.uri={tracking_uri}",
              "tracking.experiment=knetlab-gpu-check", f"tracking.run_name={run_name}"]
    if args.cpu:
        return [*common, "trainer.cpus_per_worker=1", "data.num_workers=0", "trainer.bench_images=2"]
    return [*common, "trainer.use_gpu=true", "trainer.amp=true", f"trainer.cpus_per_worker={cpus}",
            "data.num_workers=null", "trainer.bench_images=20"]


def run_training(args: argparse.Namespace, work: Path, tracking_uri: str, mlflow: subprocess.Popen) -> dict:
    """`knetlab train`'s run_training in this process, on a local Ray of its own whose workers inherit the S3
    server's endpoint; then the run's record in MLflow and its checkpoints in the bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    from knetlab.data.synthetic import generate_synthetic_ade20k
    from knetlab.platform.config import load_config
    from knetlab.platform.trainer import run_training as train

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({**FAKE_AWS, "AWS_ENDPOINT_URL": endpoint, "KNETLAB_RUNS_DIR": str(work / "runs")})
        os.environ.pop("RAY_ADDRESS", None)  # a local Ray, whatever cluster the shell points at
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"], region_name=FAKE_AWS["AWS_REGION"])
        s3.create_bucket(Bucket=BUCKET)
        sizes = {"min_side": 64, "max_side": 128} if args.cpu else {"min_side": 384, "max_side": 683}
        data_root = generate_synthetic_ade20k(work / "data", num_train=8 if args.cpu else 32, num_val=2, **sizes)
        wait_for(f"{tracking_uri}/health", mlflow)
        say(f"mlflow server answers at {tracking_uri}; S3 (moto) at {endpoint}")
        run_name = f"gpu-check-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        experiment = REPO / "experiments" / "smoke.yaml" if args.cpu else TRAIN_ROW
        cfg = load_config(experiment, [*training_overrides(args, data_root, tracking_uri, run_name),
                                       f"data.cache_dir={work / 'cache'}"])
        say(f"training: {experiment.name} ({cfg.model.name}), {args.iters} iterations")
        started = time.perf_counter()
        try:
            summary = train(cfg)  # imports Ray after setting its local-cluster environment (trainer.init_ray)
        finally:
            import ray

            ray.shutdown()
        seconds = time.perf_counter() - started
        say(f"training finished in {seconds:.0f} s")
        keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"checkpoints/{run_name}/") for item in page.get("Contents", [])]
        return {**check_run(tracking_uri, summary["mlflow_run_id"], args), "seconds": seconds,
                "checkpoint_keys": keys, "run_name": run_name}
    finally:
        moto.stop()


def check_run(tracking_uri: str, run_id: str, args: argparse.Namespace) -> dict:
    """The run's MLflow record: every logged value, the loss, the table's figures and the precision tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    histories = {key: client.get_metric_history(run_id, key) for key in run.data.metrics}
    bad = [f"{key} at step {m.step}" for key, history in histories.items() for m in history
           if not math.isfinite(m.value)]
    loss = [m.value for m in sorted(histories["train/loss"], key=lambda m: m.step)]
    return {"bad_values": bad, "loss": loss, "metrics": dict(run.data.metrics), "tags": dict(run.data.tags),
            "expected_precision": expected_precision(args)}


def expected_precision(args: argparse.Namespace) -> str:
    """What the training run's bench/precision must say: AMP's dtype for this GPU (bf16 from Ampere on), fp32 on CPU."""
    import torch

    from knetlab.precision import amp_dtype, precision_name

    device = torch.device("cpu" if args.cpu else "cuda")
    return precision_name(amp_dtype(device), device)


def training_failures(training: dict, iters: int) -> list[str]:
    failures = []
    if training["bad_values"]:
        failures.append(f"non-finite values logged: {', '.join(training['bad_values'][:10])}")
    loss = training["loss"]
    if len(loss) < 2 or not loss[-1] < loss[0]:  # each value is the mean over a log interval
        failures.append(f"the loss did not fall: {loss}")
    for key in ("bench/mem_gb", "bench/fps", "val/mIoU"):
        if key not in training["metrics"]:
            failures.append(f"{key} was not logged")
    if training["tags"].get("bench/precision") != training["expected_precision"]:
        failures.append(f"bench/precision is {training['tags'].get('bench/precision')!r}, expected "
                        f"{training['expected_precision']!r}")
    for iteration in (iters // 2, iters):
        if not any(f"/checkpoint_{iteration:07d}/model.pt" in key for key in training["checkpoint_keys"]):
            failures.append(f"checkpoint_{iteration:07d}/model.pt is not in s3://{BUCKET}/checkpoints")
    return failures


# -- (c) the table ---------------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def report(args: argparse.Namespace, rows: list[dict], training: dict | None, seconds: float) -> str:
    import torch

    from knetlab.evaluation.bench import device_name

    device = torch.device("cpu" if args.cpu else "cuda")
    cuda = f", CUDA {torch.version.cuda}" if not args.cpu else ""
    lines = [f"Measured by `scripts/gpu_check.sh{' --cpu' if args.cpu else ''}` on {datetime.date.today()}: "
             f"{device_name(device)}, torch {torch.__version__}{cuda}; whole check {seconds / 60:.1f} min.", "",
             "| Row | Crop (batch 2) | Mem (GB) seed, V100 FP32 | Mem fp32 | Mem bf16 | fps seed, V100 FP32 | fps fp32 "
             "| fps bf16 | step s fp32 | step s bf16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fp32, bf16 = row["fp32"], row["bf16"]
        (seed_mem, seed_fps) = row["seed"]
        height, width = fp32["crop_size"]
        crop = str(height) if height == width else f"{height}x{width}"
        lines.append(f"| {row['name']} | {crop} | {fmt(seed_mem)} | {fmt(fp32['bench/mem_gb'])} "
                     f"| {fmt(bf16['bench/mem_gb'])} | {fmt(seed_fps)} | {fmt(fp32['bench/fps'])} "
                     f"| {fmt(bf16['bench/fps'])} | {fmt(fp32['bench/step_s'], '.3f')} "
                     f"| {fmt(bf16['bench/step_s'], '.3f')} |")
    if rows:
        lines += ["", f"fp32 is IEEE float32 (trainer.tf32=false), as the seed's V100. Mem (GiB): "
                      f"{rows[0]['fp32']['mem_kind']}, training steps at batch 2. fps: inference at batch 1 at the "
                      "test scale, post-processing included. cudnn.benchmark is off in every benchmark."]
    for row in rows:
        if FAST_PATHS[0][0] in row:
            lines += ["", f"Fast paths, {row['name']}:", "", "| variant | precision | fps | step s | Mem |",
                      "|---|---|---|---|---|"]
            for label, *_ in PRECISIONS + FAST_PATHS:
                result = row[label]
                lines.append(f"| {label} | {result['precision']} | {fmt(result['bench/fps'])} "
                             f"| {fmt(result['bench/step_s'], '.3f')} | {fmt(result['bench/mem_gb'])} |")
    if training is not None:
        loss = training["loss"]
        metrics = training["metrics"]
        lines += ["", f"Training run ({training['run_name']}): {args.iters} iterations in {training['seconds']:.0f} s "
                      f"including start-up, {training['tags'].get('bench/precision')}; loss {loss[0]:.3f} -> "
                      f"{loss[-1]:.3f}; val mIoU {fmt(metrics.get('val/mIoU'))}; Mem "
                      f"{fmt(metrics.get('bench/mem_gb'))} GB; fps {fmt(metrics.get('bench/fps'))}; "
                      f"{len(training['checkpoint_keys'])} checkpoint objects in S3 (moto); "
                      f"non-finite values: {len(training['bad_values'])}."]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace the text between the gpu_check markers of `path` (appended as a new section if it has none)."""
    block = f"{BEGIN}\n{text}\n{END}"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = f"{old.rstrip()}\n\n## GPU check\n\n{block}\n" if old else f"## GPU check\n\n{block}\n"
    path.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="reduced mode on CPU: tiny models, sizes and run")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write the table into (default: docs/performance.md on a GPU; none with "
                             "--cpu)")
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default 200; 20 with --cpu)")
    parser.add_argument("--images", type=int, default=None, help="timed inference images per row (default 30; 2)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (experiment file stems)")
    parser.add_argument("--skip-training", action="store_true", help="(a) and (c) only")
    args = parser.parse_args()
    args.iters = args.iters or (20 if args.cpu else 200)
    args.images = args.images or (2 if args.cpu else 30)
    out = args.out or (None if args.cpu else REPO / "docs" / "performance.md")
    started = STARTED
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as the knetlab command
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (torch sees none); on a machine without one use --cpu")
    work = Path(tempfile.mkdtemp(prefix="knetlab-gpu-check-"))
    mlflow, tracking_uri = (None, None) if args.skip_training else start_mlflow(work)  # starts during the benchmarks
    try:
        rows = run_benchmarks(args)
        training = None if args.skip_training else run_training(args, work, tracking_uri, mlflow)
    finally:
        if mlflow is not None and mlflow.poll() is None:  # the server and its workers: its own process group
            os.killpg(mlflow.pid, signal.SIGTERM)
            try:
                mlflow.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(mlflow.pid, signal.SIGKILL)
    seconds = time.perf_counter() - started
    text = report(args, rows, training, seconds)
    print(text, flush=True)
    if out is not None:
        write_section(out, text)
        say(f"table written to {out}")
    failures = training_failures(training, args.iters) if training is not None else []
    if not args.cpu and seconds > 8 * 60:
        say(f"note: the check took {seconds / 60:.1f} min, over its 8-minute budget")
    for failure in failures:
        say(f"FAILED: {failure}")
    say("passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
