"""knetlab compare against a real mlflow server: mean ± std over repeats, files written, artifacts on the parent."""

import statistics
from pathlib import Path

import pytest

from knetlab.platform.compare import CompareError, run_compare
from knetlab.platform.tracking import client, create_run, ensure_experiment

REPO = Path(__file__).resolve().parent.parent


def test_compare_table_from_mlflow(mlflow_server, tmp_path, capsys):
    uri = mlflow_server.uri
    experiment_id = ensure_experiment("compare-test", uri)
    mlflow_client = client(uri)
    parent = create_run(uri, experiment_id, "sweep", {"knetlab.sweep_id": "s1"})
    # val/mIoU is logged in percent, as the table prints it
    values = {("fcn", "512"): [30.0, 34.0], ("upernet", "640"): [40.0, 44.0]}
    for (head, crop), mious in values.items():
        for seed, miou in enumerate(mious):
            run_id = create_run(uri, experiment_id, f"{head}-{seed}", {"head": head, "backbone": "r50-d8",
                                                                       "crop": crop}, parent_run_id=parent)
            mlflow_client.log_param(run_id, "trainer.max_iters", "20")
            mlflow_client.log_metric(run_id, "val/mIoU", miou, step=20)
            mlflow_client.log_metric(run_id, "bench/fps", 10.0 + seed, step=0)
    # left out: a trial ASHA stopped at 10 iterations, and a failed one
    for tags in ({"knetlab.trial_status": "STOPPED at 10"}, {}):
        left_out = create_run(uri, experiment_id, "left-out", {"head": "fcn", "backbone": "r50-d8", "crop": "512",
                                                               **tags}, parent_run_id=parent)
        mlflow_client.log_param(left_out, "trainer.max_iters", "20")
        mlflow_client.log_metric(left_out, "val/mIoU", 1.0, step=10)
        mlflow_client.set_terminated(left_out, "KILLED" if tags else "FAILED")
    # a grid value of the sweep makes a configuration of its own
    swept = create_run(uri, experiment_id, "lr", {"head": "fcn", "backbone": "r50-d8", "crop": "512",
                                                  "knetlab.hyperparameters": "optim.lr=0.001"}, parent_run_id=parent)
    mlflow_client.log_param(swept, "trainer.max_iters", "20")
    mlflow_client.log_metric(swept, "val/mIoU", 5.0, step=20)
    other = create_run(uri, experiment_id, "unrelated", {"head": "fcn", "backbone": "r50-d8", "crop": "512"})
    mlflow_client.log_metric(other, "val/mIoU", 90.0, step=1)

    rows = run_compare(experiment="compare-test", parent_run_id="s1", out_dir=str(tmp_path), log=True,
                       sort="mIoU", tracking_uri=uri)  # by sweep id: the parent run carries knetlab.sweep_id=s1
    printed = capsys.readouterr().out
    assert [r["Method"] for r in rows] == ["KNet + UperNet", "KNet + FCN", "KNet + FCN (optim.lr=0.001)"]
    assert rows[1]["runs"] == 2 and rows[1]["mIoU"][0] == pytest.approx(32.0)
    assert "(2 failed or early-stopped run(s) left out)" in printed
    upernet = rows[0]
    assert upernet["runs"] == 2
    assert upernet["mIoU"][0] == pytest.approx(statistics.fmean([40.0, 44.0]))
    assert upernet["mIoU"][1] == pytest.approx(statistics.stdev([40.0, 44.0]))
    assert "| KNet + UperNet | R-50-D8 | 640x640 | 20 | - | 10.50 ± 0.71 | 42.00 ± 2.83 | - | 2 |" in printed
    assert {p.name for p in tmp_path.iterdir()} >= {"comparison.md", "comparison.csv", "comparison.png"}
    artifacts = {a.path for a in mlflow_client.list_artifacts(parent, "comparison")}
    assert artifacts == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/comparison.png"}
    for name in ("comparison.md", "comparison.csv"):  # the files and the artifacts are the same table
        logged = mlflow_client.download_artifacts(parent, f"comparison/{name}", str(tmp_path / "dl"))
        assert open(logged, "rb").read() == (tmp_path / name).read_bytes()
    png = mlflow_client.download_artifacts(parent, "comparison/comparison.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_compare_errors_name_the_problem(mlflow_server):
    ensure_experiment("compare-test-2", mlflow_server.uri)
    with pytest.raises(CompareError, match="--parent no-such-sweep: neither a run id nor a sweep id"):
        run_compare(experiment="compare-test-2", parent_run_id="no-such-sweep", tracking_uri=mlflow_server.uri)
    with pytest.raises(CompareError, match="no-such-experiment"):
        run_compare(experiment="no-such-experiment", tracking_uri=mlflow_server.uri)
    ensure_experiment("compare-empty", mlflow_server.uri)
    with pytest.raises(CompareError, match="no trained runs"):
        run_compare(experiment="compare-empty", tracking_uri=mlflow_server.uri)
    with pytest.raises(CompareError, match="--log needs --parent"):
        run_compare(experiment="compare-empty", log=True, tracking_uri=mlflow_server.uri)


def trained_run(uri: str, experiment: str, overrides: list[str], metrics: dict[str, float], parent: str | None,
                base: str = "smoke-panoptic.yaml") -> str:
    """A run as a training run (or a sweep trial, under `parent`) makes it: the trainer's own MLflow run (tags,
    params, config), then the metrics rank 0 logs at the last iteration (validation, the figures after training)."""
    from mlflow.entities import Metric

    from knetlab.platform.config import load_config
    from knetlab.platform.trainer import start_mlflow_run

    cfg = load_config(REPO / "experiments" / base, [f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                                                    "trainer.max_iters=100", "schedule.milestones=[80]", *overrides])
    # No dataset inputs: the runs here have no data on disk (a fresh clone has no runs/data).
    run = start_mlflow_run(cfg, "run", resume=False, parent_run_id=parent, datasets=[])
    client(uri).log_batch(run["run_id"], metrics=[Metric(key, value, 0, 100) for key, value in metrics.items()])
    return run["run_id"]


PANOPTIC_RUN = {"bench/mem_gb": 0.5, "bench/fps": 20.0, "val/PQ": 40.0, "val/SQ": 70.0, "val/RQ": 50.0,
                "val/PQ_th": 30.0, "val/PQ_st": 60.0, "val/SQ_th": 1.0}


def test_panoptic_instance_and_semantic_tables_from_the_runs_task(mlflow_server, tmp_path, capsys):
    uri, experiment = mlflow_server.uri, "compare-tasks"
    parent = create_run(uri, ensure_experiment(experiment, uri), "sweep", {"knetlab.sweep_id": "tasks-1"})
    for seed, shift in ((0, 0.0), (1, 2.0)):  # two seeds of the R-50 1x panoptic row and of tiny-panoptic
        trained_run(uri, experiment, ["model.name=knet-s3_r50_fpn_1x_coco-panoptic", f"trainer.seed={seed}"],
                    {k: v + shift for k, v in PANOPTIC_RUN.items()}, parent)
        trained_run(uri, experiment, [f"trainer.seed={seed}"], {"val/PQ": 10.0 + shift}, parent)
    trained_run(uri, experiment, ["model.name=tiny-instance"],  # NaN: COCOeval had nothing to average
                {"bench/fps": 9.0, "val/segm_mAP": 30.0, "val/segm_mAP_50": 50.0, "val/segm_mAP_75": float("nan")},
                parent)
    trained_run(uri, experiment, ["data.crop_size=96"], {"val/mIoU": 20.0, "val/mIoU_msflip": 23.5}, parent,
                base="smoke.yaml")

    rows = run_compare(experiment=experiment, parent_run_id="tasks-1", out_dir=str(tmp_path), log=True, sort="PQ",
                       tracking_uri=uri)
    printed = capsys.readouterr().out
    assert ("| Backbone | Method | Lr Schd | Mem (GB) | Inf time (fps) | PQ | SQ | RQ | PQ_th | PQ_st | runs |"
            in printed)
    assert ("| R-50 | K-Net | 1x (100 it) | 1.50 ± 1.41 | 21.00 ± 1.41 | 41.00 ± 1.41 | 71.00 ± 1.41 | 51.00 ± 1.41 "
            "| 31.00 ± 1.41 | 61.00 ± 1.41 | 2 |") in printed
    assert "| tiny | K-Net | 1x (100 it) | - | - | 11.00 ± 1.41 | - | - | - | - | 2 |" in printed
    assert "| Backbone | Method | Lr Schd | Mem (GB) | Inf time (fps) | mask AP | AP50 | AP75 | runs |" in printed
    assert "| tiny | K-Net | 1x (100 it) | - | 9.00 ± 0.00 | 30.00 ± 0.00 | 50.00 ± 0.00 | - | 1 |" in printed
    assert ("| Method | Backbone | Crop Size | Lr schd | Mem (GB) | Inf time (fps) | mIoU | mIoU(ms+flip) | runs |"
            in printed)
    assert "| KNet + FCN | tiny | 96x96 | 100 | - | - | 20.00 ± 0.00 | 23.50 ± 0.00 | 1 |" in printed
    # one table per task, in the families' order; --sort PQ orders the panoptic rows best first
    assert printed.index("semantic:") < printed.index("panoptic:") < printed.index("instance:")
    assert [(r["task"], r.get("Backbone")) for r in rows][1:3] == [("panoptic", "R-50"), ("panoptic", "tiny")]
    files = {"comparison-semantic", "comparison-panoptic", "comparison-instance"}
    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}.{ext}" for stem in files for ext in ("md", "csv", "png")}
    artifacts = {a.path for a in mlflow_server.client().list_artifacts(parent, "comparison")}
    assert artifacts == {f"comparison/{stem}.{ext}" for stem in files for ext in ("md", "csv", "png")}
    with pytest.raises(CompareError, match=r"--sort 'mIoU_ms': not a column; valid: .*PQ_th"):
        run_compare(experiment=experiment, sort="mIoU_ms", tracking_uri=uri)


def test_compare_takes_the_tracking_uri_and_never_prints_its_credentials(mlflow_server, capsys, monkeypatch):
    from conftest import free_port

    from knetlab.platform.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = "compare-uri"
    ensure_experiment(experiment, mlflow_server.uri)
    trained_run(mlflow_server.uri, experiment, [], {"val/PQ": 12.0}, parent=None)
    with_password = mlflow_server.uri.replace("http://", "http://alice:s3cret@")
    assert main(["compare", "--experiment", experiment, "--tracking-uri", with_password]) == 0
    out, err = capsys.readouterr()
    assert "| tiny | K-Net | 1x (100 it) | - | - | 12.00 ± 0.00 |" in out
    assert main(["compare", "--experiment", "no-such", "--tracking-uri", with_password]) == 1
    out, err = capsys.readouterr()
    assert err == f"knetlab: error: MLflow experiment 'no-such' does not exist at http://***@127.0.0.1:" \
                  f"{mlflow_server.port}\n"
    # nothing answers: one line, fast (two retries), without the password
    closed = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    assert main(["compare", "--experiment", experiment, "--tracking-uri", closed]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("knetlab: error: tracking URI http://***@127.0.0.1:") and err.count("\n") == 1, err
    assert "s3cret" not in out + err
