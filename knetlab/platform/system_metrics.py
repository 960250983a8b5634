"""System metrics of a training run (CPU, memory, disk, network; GPU utilisation, memory and power where NVML sees a
GPU), sampled on rank 0 every `tracking.system_metrics_interval` seconds and logged as MLflow's `system/...`
metrics, which the MLflow UI shows in its System metrics charts: a loader-bound run shows as busy CPUs beside idle
GPUs.

The sampling is MLflow's own (its monitor classes: psutil, and pynvml from nvidia-ml-py), the delivery is knetlab's:
the samples go through the run's `RunLogger`, so an MLflow outage never blocks or fails training (they are spooled
and sent later). MLflow's `SystemMetricsMonitor` (`log_system_metrics=True`) is not used: it asks the server for the
run's status at every sample, stops for good at the first failed request, and its final flush waits on the server.

Metrics are logged at the training iteration they were sampled at, so they line up with `train/*` in the charts;
samples taken while the iteration stands still (validation, checkpointing, a stalled loader) are averaged into the
next iteration's point, and one last point is logged when the run ends, so even a run shorter than the interval has
one. A restarted run skips steps it already logged, as for every other metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

PREFIX = "system/"


def system_monitors() -> list[Any]:
    """MLflow's CPU/memory, disk and network monitors, and its NVIDIA GPU monitor when NVML finds a GPU."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        monitors.append(GPUMonitor())
    except Exception:  # no nvidia-ml-py, no driver or no GPU: the other metrics only
        pass
    return monitors


def start_system_metrics(log_metrics: Callable[[dict[str, float], int], None], current_step: Callable[[], int],
                         interval_s: float, monitors: list[Any] | None = None) -> Callable[[], None]:
    """Sample every `interval_s` seconds on a daemon thread and hand `system/...` averages to `log_metrics(metrics,
    step)` whenever `current_step()` has moved on; returns the function that stops it (after a last sample).
    `interval_s` <= 0: nothing is sampled."""
    if interval_s <= 0:
        return lambda: None
    monitors = system_monitors() if monitors is None else monitors
    stopping = threading.Event()
    logged = {"step": None}

    def sample(last: bool) -> None:
        for monitor in monitors:
            monitor.collect_metrics()
        step = current_step()
        if step == logged["step"] and not last:
            return  # the iteration stands still: averaged into the next point
        metrics = {}
        for monitor in monitors:
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        if metrics and step != logged["step"]:
            log_metrics({PREFIX + key: float(value) for key, value in metrics.items()}, step)
            logged["step"] = step

    def loop() -> None:
        import psutil

        # psutil measures CPU use between two calls of the same thread: this first one starts the first interval.
        psutil.cpu_percent()
        while True:
            last = stopping.wait(interval_s)
            try:
                sample(last)
            except Exception as error:  # never the run's problem: say so once and stop sampling
                print(f"[knetlab] system metrics stopped: {type(error).__name__}: {error}", flush=True)
                return
            if last:
                return

    thread = threading.Thread(target=loop, name="knetlab-system-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(timeout=30)  # a sample is local work (psutil, NVML, an append to the spool file)

    return stop
