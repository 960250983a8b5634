"""knetlab compare against a real mlflow server: mean ± std over repeats, files written, artifacts on the parent."""

import statistics

import pytest

from knetlab.platform.compare import CompareError, run_compare
from knetlab.platform.tracking import client, create_run, ensure_experiment


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
