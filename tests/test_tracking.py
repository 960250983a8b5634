"""knetlab.platform.tracking against a real `mlflow server` (the `mlflow_server` fixture, stopped and started again
to simulate an outage) and the default local sqlite store: params and tags (redacted), metrics with steps and
artifacts arrive; an outage neither blocks nor loses anything; a restarted run never logs a step twice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, MlflowServer, free_port

from knetlab.platform.tracking import (
    PARAM_VALUE_LIMIT,
    SPOOL_FILE,
    RunLogger,
    TrackingError,
    client,
    create_run,
    ensure_experiment,
    find_run,
    http_settings,
    log_params,
    metric_history,
    resolve_tracking_uri,
)


def new_run(uri: str, name: str, **tags: str) -> str:
    return create_run(uri, ensure_experiment(f"tracking-{name}", uri), name, {"test": name, **tags})


def history(server: MlflowServer, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) in the server's order (by timestamp, then step)."""
    return [(m.step, m.value) for m in server.client().get_metric_history(run_id, key)]


def downloaded(server: MlflowServer, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(server.client().download_artifacts(run_id, path, str(tmp_path / "dl"))).read_text()


# -- URIs, params -----------------------------------------------------------------------------------------------------
def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNETLAB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_tracking_uri(None).startswith("sqlite:////")  # an absolute path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://mlflow:80") == "http://mlflow:80"


def test_http_settings_are_scoped_and_respect_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    with http_settings({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}):
        with http_settings({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}):
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # the outer block's value holds
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"  # the user's setting wins
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"


# -- the default local store ------------------------------------------------------------------------------------------
def test_default_sqlite_store_with_local_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNETLAB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None)
    experiment_id = ensure_experiment("local default", uri)
    assert ensure_experiment("local default", uri) == experiment_id
    location = client(uri).get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "runs" / "mlartifacts" / "local_default").as_uri()
    run_id = create_run(uri, experiment_id, "local", {"head": "fcn"})
    (tmp_path / "table.csv").write_text("class,IoU\nwall,50.0\n")
    log_params(client(uri), run_id, {"optim.lr": 0.001})
    logger = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    logger.log_metrics({"train/loss": 1.5}, step=10)
    logger.set_tags({"bench/precision": "bf16", "where": "s3://key:secret@bucket/x"})
    logger.log_artifact(tmp_path / "table.csv", artifact_path="eval")
    assert logger.close()
    assert metric_history(uri, run_id, "train/loss") == [(10, 1.5)]
    tags = client(uri).get_run(run_id).data.tags
    assert tags["bench/precision"] == "bf16" and "secret" not in tags["where"]
    assert client(uri).get_run(run_id).data.params == {"optim.lr": "0.001"}
    stored = list((tmp_path / "runs" / "mlartifacts").rglob("table.csv"))
    assert len(stored) == 1 and run_id in str(stored[0]) and stored[0].read_text().startswith("class,IoU")
    assert not (REPO_ROOT / "mlruns").exists() or not any((REPO_ROOT / "mlruns").rglob(run_id))


# -- the tracking server ----------------------------------------------------------------------------------------------
def test_params_metrics_tags_and_artifacts_arrive(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    uri = mlflow_server.uri
    parent = new_run(uri, "parent")
    run_id = new_run(uri, "child", secret_url="https://bob:pw123@host/x")
    create_run(uri, ensure_experiment("tracking-child", uri), "child-of", {}, parent_run_id=parent)
    child = find_run(uri, ensure_experiment("tracking-child", uri), {"mlflow.parentRunId": parent})
    assert child is not None and child != run_id
    assert find_run(uri, ensure_experiment("tracking-child", uri), {"test": "it's"}) is None  # quotes are escaped

    log_params(client(uri), run_id, {"optim.lr": 1e-4, "tracking.uri": "http://u:p4ss@mlflow:5000",
                                     "aws.secret_key": "abc", "data.scale": [2048, 512]})
    logger = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    for step in range(1, 6):
        logger.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-4 * step}, step=step)
    logger.log_metrics({"val/mIoU": 12.5, **{f"val/IoU/class_{i}": float(i) for i in range(150)}}, step=5)
    table = tmp_path / "per_class_iou.csv"
    table.write_text("class,IoU\nwall,10.0\n")
    logger.log_artifact(table, artifact_path="eval/iter_0000005")
    table.unlink()  # the caller may delete it at once
    figures = tmp_path / "figures"
    (figures / "overlays").mkdir(parents=True)
    (figures / "overlays" / "overlay_0.png").write_bytes(b"png")
    logger.log_artifact(figures, artifact_path="eval")  # a directory, with what is inside it
    assert logger.close()

    run = mlflow_server.client().get_run(run_id)
    assert run.data.params == {"optim.lr": "0.0001", "tracking.uri": "http://***@mlflow:5000",
                               "aws.secret_key": "***", "data.scale": "[2048, 512]"}
    tags = run.data.tags
    assert tags["secret_url"] == "https://***@host/x" and tags["test"] == "child"
    assert history(mlflow_server, run_id, "train/loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert [s for s, _ in history(mlflow_server, run_id, "train/lr")] == [1, 2, 3, 4, 5]
    assert history(mlflow_server, run_id, "val/IoU/class_149") == [(5, 149.0)]
    assert len([k for k in run.data.metrics if k.startswith("val/IoU/")]) == 150
    assert downloaded(mlflow_server, run_id, "eval/iter_0000005/per_class_iou.csv", tmp_path).startswith("class")
    assert downloaded(mlflow_server, run_id, "eval/figures/overlays/overlay_0.png", tmp_path) == "png"
    assert mlflow_server.client().get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert not (tmp_path / "spool" / SPOOL_FILE).exists()
    assert not any((tmp_path / "spool" / "artifacts").rglob("*.*")), "artifact copies left behind"


def test_restarted_run_logs_each_step_once(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    uri = mlflow_server.uri
    run_id = new_run(uri, "restart")
    first = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    for step in range(1, 41):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"val/mIoU": 40.0}, step=40)
    assert first.close()
    # The worker group restarts from the checkpoint at iteration 30 and runs 31..55 again with new values.
    second = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    for step in range(31, 56):
        second.log_metrics({"train/loss": 1000.0 + step, "train/lr": 0.1}, step=step)
        if step % 10 == 0:
            second.log_metrics({"val/mIoU": 1000.0 + step}, step=step)
    assert second.close()
    loss = history(mlflow_server, run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 56))
    assert dict(loss)[40] == 40.0 and dict(loss)[41] == 1041.0  # the first value of a step is kept
    assert history(mlflow_server, run_id, "val/mIoU") == [(40, 40.0), (50, 1050.0)]
    assert [s for s, _ in history(mlflow_server, run_id, "train/lr")] == list(range(31, 56))


def test_server_outage_neither_blocks_nor_loses_records(mlflow_server: MlflowServer, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    uri = mlflow_server.uri
    run_id = new_run(uri, "outage")
    spool = tmp_path / "spool"
    logger = RunLogger(uri, run_id, spool_dir=spool)
    for step in range(1, 11):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert logger.flush(30)
    artifact = tmp_path / "overlay_0.png"
    artifact.write_bytes(b"\x89PNG fake image bytes")
    mlflow_server.stop()
    try:
        started = time.monotonic()
        for step in range(11, 31):
            logger.log_metrics({"train/loss": float(step), "train/lr": step / 100}, step=step)
            if step == 20:
                logger.log_artifact(artifact, artifact_path="eval/iter_0000020")
        calls_s = time.monotonic() - started
        print(f"20 log calls during the outage took {calls_s * 1000:.1f} ms")
        # MLflow's default client would block for minutes on the first call; a generous bound, not a timing figure.
        assert calls_s < 5.0
        assert not logger.flush(timeout_s=2.0)
        spooled = [json.loads(line) for line in (spool / SPOOL_FILE).read_text().splitlines() if line.strip()]
        assert {r["kind"] for r in spooled} == {"metrics", "artifact"}
    finally:
        mlflow_server.start()
    assert logger.flush(timeout_s=60)
    assert logger.close()
    assert "unreachable" in capsys.readouterr().out
    loss = history(mlflow_server, run_id, "train/loss")
    assert loss == [(s, float(s)) for s in range(1, 31)]  # each step once, in step (and time) order
    assert [s for s, _ in history(mlflow_server, run_id, "train/lr")] == list(range(11, 31))
    image = mlflow_server.client().download_artifacts(run_id, "eval/iter_0000020/overlay_0.png", str(tmp_path))
    assert Path(image).read_bytes() == b"\x89PNG fake image bytes"
    assert not (spool / SPOOL_FILE).exists()


def test_close_during_outage_leaves_the_spool_for_the_next_logger(mlflow_server: MlflowServer, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    uri = mlflow_server.uri
    run_id = new_run(uri, "spool-handover")
    spool = tmp_path / "spool"
    logger = RunLogger(uri, run_id, spool_dir=spool)
    for step in range(1, 6):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert logger.flush(30)
    mlflow_server.stop()
    try:
        for step in range(6, 16):
            logger.log_metrics({"train/loss": float(step)}, step=step)
        report = tmp_path / "per_class_iou.csv"
        report.write_text("class,IoU\n")
        logger.log_artifact(report, artifact_path="eval")
        report.unlink()
        assert not logger.close(timeout_s=2.0)
        out = capsys.readouterr().out
        assert str(spool / SPOOL_FILE) in out and "did not answer" in out
        assert (spool / SPOOL_FILE).exists()
    finally:
        mlflow_server.start()
    # The resumed run's logger (same run, same spool dir) sends what was left, then goes on without duplicates.
    resumed = RunLogger(uri, run_id, spool_dir=spool)
    for step in range(11, 21):
        resumed.log_metrics({"train/loss": float(step)}, step=step)
    assert resumed.close()
    assert history(mlflow_server, run_id, "train/loss") == [(s, float(s)) for s in range(1, 21)]
    assert [a.path for a in mlflow_server.client().list_artifacts(run_id, "eval")] == ["eval/per_class_iou.csv"]
    assert not (spool / SPOOL_FILE).exists()


def test_rejected_records_are_dropped_without_blocking_the_rest(mlflow_server: MlflowServer, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    uri = mlflow_server.uri
    run_id = new_run(uri, "rejected")
    logger = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    logger.log_metrics({"good": 1.0, "bad key!": 2.0}, step=1)
    logger.log_metrics({"good": 2.0}, step=2)
    logger.log_metrics({"worse key?": 3.0, "good": 3.0}, step=3)
    assert logger.close()
    assert history(mlflow_server, run_id, "good") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert set(mlflow_server.client().get_run(run_id).data.metrics) == {"good"}
    assert logger.dropped == 2
    out = capsys.readouterr().out
    assert "metric 'bad key!' at step 1" in out and "metric 'worse key?' at step 3" in out


def test_log_params_up_front_redacts(mlflow_server: MlflowServer) -> None:
    uri = mlflow_server.uri
    run_id = new_run(uri, "params")
    log_params(client(uri), run_id, {"storage.uri": "s3://b/x", "db": "postgresql://u:pw@db/m", "my_token": "t0k",
                                     "tracking.tags.note": "x" * 7000, "optim.betas": (0.9, 0.999)})
    assert mlflow_server.client().get_run(run_id).data.params == {
        "storage.uri": "s3://b/x", "db": "postgresql://***@db/m", "my_token": "***",
        "tracking.tags.note": "x" * PARAM_VALUE_LIMIT, "optim.betas": "[0.9, 0.999]"}


# -- errors up front ---------------------------------------------------------------------------------------------------
def test_unreachable_server_is_one_line_error() -> None:
    uri = f"http://user:secret-pw@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as error:
        ensure_experiment("x", uri)
    message = str(error.value)
    assert "\n" not in message and message.startswith("tracking.uri=http://***@127.0.0.1:")
    assert "secret-pw" not in message


def test_deleted_experiment_is_one_line_error(mlflow_server: MlflowServer) -> None:
    uri = mlflow_server.uri
    experiment_id = ensure_experiment("tracking-deleted", uri)
    mlflow_server.client().delete_experiment(experiment_id)
    with pytest.raises(TrackingError) as error:
        ensure_experiment("tracking-deleted", uri)
    assert "tracking.experiment=tracking-deleted" in str(error.value) and "restore" in str(error.value)
