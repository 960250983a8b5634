"""Sweep files, trial configs, the up-front checks and the concurrency plan of `knetlab sweep` (no Ray cluster
needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tracking_db

from knetlab.platform.sweep import (
    DRIVER_RESOURCE,
    build_tune_scheduler,
    driver_resources,
    find_sweep,
    param_space,
    plan_concurrency,
    start_parent_run,
    with_scheduler_metric,
)
from knetlab.platform.sweep_spec import SweepError, expand_trials, load_sweep, setting_label, trial_config
from knetlab.platform.sweep_summary import summary_markdown

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"


def write_sweep(tmp_path: Path, **data) -> Path:
    content = {"name": "t", "experiment": str(SMOKE), **data}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_shipped_sweeps_expand_to_valid_configs() -> None:
    smoke = load_sweep(REPO / "experiments" / "sweeps" / "smoke.yaml")
    assert smoke.trial_count() == 6
    configs = expand_trials(smoke)
    assert [(c.model.name, c.data.crop_size) for c in configs] == [("tiny-fcn", 64), ("tiny-psp", 64),
                                                                   ("tiny-fcn", 96)]
    table = load_sweep(REPO / "experiments" / "sweeps" / "ade20k-table.yaml")
    configs = expand_trials(table)
    names = sorted(p.stem for p in (REPO / "experiments" / "ade20k").glob("knet-*.yaml"))
    assert sorted(c.model.name for c in configs) == names  # the table's 7 rows, each from its own experiment file
    swin_l_640 = next(c for c in configs if c.model.name.endswith("640x640"))
    assert swin_l_640.data.crop_size == 640 and swin_l_640.optim.lr == 6.0e-5


def test_table_sweeps_train_every_row_to_its_end_and_the_search_stops_early() -> None:
    from knetlab.models.det_zoo import DET_MODELS

    sweeps = REPO / "experiments" / "sweeps"
    for task, metric in (("panoptic", "val/PQ"), ("instance", "val/segm_mAP")):
        spec = load_sweep(sweeps / f"coco-{task}-table.yaml")
        configs = expand_trials(spec)
        # every row of the K-Net COCO zoo for the task, each from experiments/coco/<its zoo name>.yaml
        assert [Path(row["experiment"]).stem for row in spec.rows] == [c.model.name for c in configs]
        assert sorted(c.model.name for c in configs) == sorted(
            name for name, zoo in DET_MODELS.items() if zoo.task == task and not name.startswith("tiny"))
        assert spec.scheduler["type"] == "fifo"  # every row to its end, ranked by the rows' own metric
        assert with_scheduler_metric(spec, configs).scheduler["metric"] == metric
    table = load_sweep(sweeps / "ade20k-table.yaml")
    assert table.scheduler["type"] == "fifo" and table.overrides == {"eval.final_ms_flip": True}
    search = load_sweep(sweeps / "lr-search.yaml")
    assert search.scheduler["type"] == "asha" and list(search.search) == ["optim.lr"]
    configs = expand_trials(search)  # the search's bounds
    assert {(c.model.name, c.optim.lr) for c in configs} == {
        ("knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512", lr) for lr in (3.0e-5, 3.0e-4)}


def test_the_scheduler_metric_defaults_to_the_rows_ranking_metric(tmp_path: Path) -> None:
    panoptic = load_sweep(REPO / "experiments" / "sweeps" / "smoke-panoptic.yaml")
    configs = expand_trials(panoptic)
    assert panoptic.trial_count() == 4 and {c.optim.lr for c in configs} == {1.0e-3, 5.0e-4}
    assert with_scheduler_metric(panoptic, configs).scheduler["metric"] == "val/PQ"
    smoke = load_sweep(REPO / "experiments" / "sweeps" / "smoke.yaml")
    assert with_scheduler_metric(smoke, expand_trials(smoke)).scheduler["metric"] == "val/mIoU"  # as written there
    instance = load_sweep(write_sweep(tmp_path, rows=[{"model.name": "tiny-instance"}]))
    assert with_scheduler_metric(instance, expand_trials(instance)).scheduler["metric"] == "val/segm_mAP"
    mixed = load_sweep(write_sweep(tmp_path, rows=[{"model.name": "tiny-fcn"}, {"model.name": "tiny-panoptic"}]))
    with pytest.raises(SweepError, match="rows are of different tasks, ranked by val/PQ, val/mIoU"):
        with_scheduler_metric(mixed, expand_trials(mixed))


def test_trial_config_layers_rows_grid_seed_and_command_line(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, overrides={"trainer.max_iters": 50, "schedule.milestones": [40]},
                       rows=[{"model.name": "tiny-psp"}, {"model.name": "tiny-fcn", "data.crop_size": 96}],
                       grid={"optim.lr": [1.0e-4, 1.0e-3]}, repeats=3)
    spec = load_sweep(path, ["trainer.max_iters=30", "schedule.milestones=[20]", "repeats=2"])
    assert spec.repeats == 2 and spec.trial_count() == 2 * 2 * 2
    cfg = trial_config(spec, 1, 1, {"optim.lr": 1.0e-3})
    assert (cfg.model.name, cfg.data.crop_size, cfg.optim.lr) == ("tiny-fcn", 96, 1.0e-3)
    assert cfg.trainer.max_iters == 30 and list(cfg.schedule.milestones) == [20]  # the command line wins
    assert cfg.trainer.seed == 1  # smoke.yaml's seed 0 + repeat 1
    assert setting_label(spec, 1, {"optim.lr": 1.0e-3}) == "model.name=tiny-fcn, data.crop_size=96, optim.lr=0.001"


@pytest.mark.parametrize(("data", "message"), [
    ({"nmae": "x"}, "nmae: unknown sweep key"),
    ({"name": "has space"}, "name: a name without spaces"),
    ({"experiment": "nope.yaml"}, "experiment: "),
    ({"rows": [{"experiment": "nope.yaml"}]}, "rows[0].experiment"),
    ({"rows": "tiny"}, "rows: expected a list"),
    ({"grid": {"optim.lr": []}}, "grid.optim.lr: expected a non-empty list"),
    ({"search": {"optim.lr": {"gaussian": [0, 1]}}}, "search.optim.lr: expected one of"),
    ({"search": {"optim.lr": {"loguniform": [0, 1]}}}, "bounds must be > 0"),
    ({"search": {"optim.lr": {"uniform": [1, 0]}}}, "low < high"),
    ({"grid": {"optim.lr": [1]}, "search": {"optim.lr": {"uniform": [0, 1]}}}, "in both grid and search"),
    ({"repeats": 0}, "repeats: must be an integer >= 1"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type: 'pbt' is not one of asha, fifo"),
    ({"scheduler": {"metric": "train/loss"}}, "scheduler.metric: must be a validation metric"),
    ({"scheduler": {"grace_period": 0}}, "scheduler.grace_period"),
    ({"scheduler": {"reduction_factor": 1}}, "reduction_factor: must be > 1"),
    ({"limits": {"max_concurrent": 2}}, "limits.max_concurrent: unknown key"),
    ({"limits": {"max_concurrent_trials": 0}}, "limits.max_concurrent_trials"),
])
def test_bad_sweep_files_are_refused_naming_the_key(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(SweepError, match=None) as error:
        load_sweep(write_sweep(tmp_path, **data))
    assert message in str(error.value)
    assert str(tmp_path / "sweep.yaml") in str(error.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"repaets": 2}, "repaets: unknown sweep key; did you mean repeats? (valid keys at the top level: name, "),
    ({"scheduler": {"grace": 5}}, "scheduler.grace: unknown key; did you mean scheduler.grace_period? (valid keys in "
                                  "scheduler: type, metric, mode, grace_period, reduction_factor)"),
    ({"repeats": "many"}, "repeats: expected an integer, got 'many'"),
    ({"repeats": True}, "repeats: expected an integer, got True"),
    ({"grid": {"optim.lr": 0.1}}, "grid.optim.lr: expected a list of values, got 0.1"),
    ({"limits": {"autoscaling": [1]}}, "limits.autoscaling: expected true or false, got [1]"),
    ({"scheduler": "asha"}, "scheduler is a section with keys (type, metric, mode"),
])
def test_the_sweep_schema_names_the_key_and_what_is_valid(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(SweepError) as error:
        load_sweep(write_sweep(tmp_path, **data))
    assert str(error.value).startswith(f"{tmp_path / 'sweep.yaml'}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_null_sections_are_empty(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: t\nexperiment: {SMOKE}\noverrides:\n  # trainer.max_iters: 10\nrows:\ngrid:\nsearch:\n")
    spec = load_sweep(path)
    assert (spec.overrides, spec.rows, spec.grid, spec.search) == ({}, [{}], {}, {}) and spec.trial_count() == 1


def test_command_line_sets_sweep_keys_and_the_seed_repeats_count_from(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, rows=[{"model.name": "tiny-fcn", "trainer.seed": 3}, {"model.name": "tiny-psp"}],
                       repeats=2)
    spec = load_sweep(path, ["grid.optim.lr=[1.0e-4,1.0e-3]", "scheduler.type=fifo", "limits.max_failures=2",
                             "trainer.seed=10"])
    assert spec.grid == {"optim.lr": [1.0e-4, 1.0e-3]} and spec.scheduler["type"] == "fifo"
    assert spec.limits["max_failures"] == 2 and spec.cli_overrides == ["trainer.seed=10"]
    # the command line's seed wins over the row's, and the repeats count from it
    assert [trial_config(spec, 0, repeat, {"optim.lr": 1.0e-3}).trainer.seed for repeat in (0, 1)] == [10, 11]
    assert trial_config(spec, 1, 1, {"optim.lr": 1.0e-3}).trainer.seed == 11
    # without it, each row's own seed is the base
    plain = load_sweep(path)
    assert [trial_config(plain, row, 1, {}).trainer.seed for row in (0, 1)] == [4, 1]
    for item, message in (("repeats=0", "override 'repeats=0': repeats: must be an integer >= 1"),
                          ("scheduler.typo=1", "override 'scheduler.typo=1': scheduler.typo: unknown key"),
                          ("limits.max_concurrent_trials=x", "limits.max_concurrent_trials: expected an integer or "
                                                             "null, got 'x'"),
                          ("repeats", "override 'repeats': expected key=value (e.g. repeats=3")):
        with pytest.raises(SweepError) as error:
            load_sweep(path, [item])
        assert message in str(error.value)


def test_invalid_combinations_are_refused_before_anything_starts(tmp_path: Path) -> None:
    rows = [{"model.name": "tiny"}, {"model.name": "tiny", "data.crop_size": 16}]
    spec = load_sweep(write_sweep(tmp_path, rows=rows))
    with pytest.raises(SweepError, match=r"rows\[1\] with model.name=tiny, data.crop_size=16 is invalid: .*crop_size"):
        expand_trials(spec)
    spec = load_sweep(write_sweep(tmp_path, rows=[{"model.name": "knet-no-such-model"}]))
    with pytest.raises(SweepError, match=r"rows\[0\].*knet-no-such-model"):
        expand_trials(spec)
    # a distribution's bound is checked too: a negative lr only at the low end of the range
    spec = load_sweep(write_sweep(tmp_path, search={"optim.lr": {"uniform": [-1.0, 1.0e-3]}}))
    with pytest.raises(SweepError, match=r"optim.lr=-1"):
        expand_trials(spec)
    with pytest.raises(SweepError, match=r"trainer.max_iters must be an integer, got 'oops'"):
        expand_trials(load_sweep(write_sweep(tmp_path), ["trainer.max_iters=oops"]))


def test_concurrency_follows_the_cluster_and_oversized_trials_are_refused(tmp_path: Path) -> None:
    spec = load_sweep(write_sweep(tmp_path, overrides={"trainer.num_workers": 2}, repeats=4))
    configs = expand_trials(spec)
    assert plan_concurrency(spec, configs, {"CPU": 8.0, DRIVER_RESOURCE: 64.0}) == 4  # 2 workers x 1 CPU each
    assert plan_concurrency(spec, configs, {"CPU": 8.0}) == 3  # each driver's 0.01 CPU leaves 7.97 for workers
    assert plan_concurrency(spec, configs, {"CPU": 64.0, DRIVER_RESOURCE: 64.0}) == 4  # no more than the trials
    gpu = load_sweep(write_sweep(tmp_path, overrides={"trainer.num_workers": 2, "trainer.use_gpu": True}, repeats=8))
    assert plan_concurrency(gpu, expand_trials(gpu), {"CPU": 64.0, "GPU": 8.0, DRIVER_RESOURCE: 16.0}) == 4
    with pytest.raises(SweepError, match=r"a trial needs 4 CPU \(2 workers x 2 CPU.*the Ray cluster has 2 CPU"):
        big = load_sweep(write_sweep(tmp_path, overrides={"trainer.num_workers": 2, "trainer.cpus_per_worker": 2}))
        plan_concurrency(big, expand_trials(big), {"CPU": 2.0, DRIVER_RESOURCE: 64.0})
    with pytest.raises(SweepError, match=r"needs 2 GPU .* has 0 GPU"):
        plan_concurrency(gpu, expand_trials(gpu), {"CPU": 64.0})
    scaling = load_sweep(write_sweep(tmp_path, overrides={"trainer.use_gpu": True}), ["limits.autoscaling=true"])
    with pytest.raises(SweepError, match=r"needs limits.max_concurrent_trials"):
        plan_concurrency(scaling, expand_trials(scaling), {"CPU": 8.0})
    scaling.limits["max_concurrent_trials"] = 8
    assert plan_concurrency(scaling, expand_trials(scaling), {"CPU": 8.0}) == 8  # GPUs come with the autoscaler
    assert driver_resources({"CPU": 8.0, DRIVER_RESOURCE: 16.0}) == {"cpu": 0, DRIVER_RESOURCE: 1}
    assert driver_resources({"CPU": 8.0}) == {"cpu": 0.01}


def test_search_space_and_scheduler(tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.sample import Float

    spec = load_sweep(write_sweep(tmp_path, rows=[{}, {"data.crop_size": 96}], grid={"optim.weight_decay": [0, 1e-4]},
                                  search={"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}}, repeats=2,
                                  overrides={"trainer.max_iters": 100, "trainer.eval_interval": 10,
                                             "schedule.milestones": [80]}))
    space = param_space(spec)
    assert space["row"] == {"grid_search": [0, 1]} and space["repeat"] == {"grid_search": [0, 1]}
    assert space["optim.weight_decay"] == {"grid_search": [0, 1e-4]}
    assert isinstance(space["optim.lr"], Float)
    scheduler = build_tune_scheduler(spec, expand_trials(spec))
    assert isinstance(scheduler, ASHAScheduler)
    # rungs strictly below max_iters (no decision at a trial's last report) and nothing stopped for reaching the end
    rungs = [milestone for milestone, _ in scheduler._brackets[0]._rungs]
    assert max(rungs) < 100 and min(rungs) == 10
    assert not scheduler._stop_last_trials
    fifo = load_sweep(write_sweep(tmp_path), ["scheduler.type=fifo"])
    assert isinstance(build_tune_scheduler(fifo, expand_trials(fifo)), FIFOScheduler)


def test_summary_markdown_lists_every_trial() -> None:
    rows = [{"trial": "a_00000", "setting": "model.name=tiny", "seed": "0", "status": "FINISHED", "iteration": 20,
             "val/mIoU": 12.345, "first_iter_s": 30.5, "run_id": "r0"},
            {"trial": "a_00001", "setting": "model.name=tiny", "seed": "1", "status": "STOPPED at 10",
             "iteration": 10, "val/mIoU": None, "first_iter_s": None, "run_id": "r1"}]
    text = summary_markdown(rows)
    assert "| a_00000 | model.name=tiny | 0 | FINISHED | 20 | 12.35 | 30.50 | r0 |" in text
    assert "| a_00001 | model.name=tiny | 1 | STOPPED at 10 | 10 | - | - | r1 |" in text


def test_resume_finds_the_newest_sweep_and_insists_on_the_same_overrides(tmp_path: Path) -> None:
    from knetlab.platform import tracking

    uri = tracking_db(tmp_path)
    path = write_sweep(tmp_path, overrides={"tracking.experiment": "resume-test", "tracking.uri": uri})
    spec = load_sweep(path, ["trainer.max_iters=30", "schedule.milestones=[20]"])
    cfg = expand_trials(spec)[0]
    older = start_parent_run(spec, cfg, "t-1")
    newer = start_parent_run(spec, cfg, "t-2")
    experiment_id = newer["experiment_id"]
    assert find_sweep(uri, experiment_id, spec, None) == ("t-2", newer["run_id"])
    assert find_sweep(uri, experiment_id, spec, "t-1") == ("t-1", older["run_id"])
    params = tracking.client(uri).get_run(newer["run_id"]).data.params
    assert params["sweep.cli_overrides"] == "trainer.max_iters=30 schedule.milestones=[20]"
    assert params["sweep.trials"] == "1" and params["sweep.scheduler.type"] == "asha"
    with pytest.raises(SweepError, match=r"started with the overrides 'trainer.max_iters=30 schedule"):
        find_sweep(uri, experiment_id, load_sweep(path, ["trainer.max_iters=40"]), None)
    with pytest.raises(SweepError, match="no parent run of sweep t-9"):
        find_sweep(uri, experiment_id, spec, "t-9")


def test_the_summary_delivers_what_a_stopped_trial_left_in_its_spool(tmp_path: Path) -> None:
    """ASHA kills a stopped trial's workers, often before rank 0 sent its last validation: the records stay in the
    trial's spool, and the sweep's summary sends them before it reads the runs."""
    import json

    from knetlab.platform.run_spool import SPOOL_FILE, run_spool_dir
    from knetlab.platform.sweep_summary import deliver_leftover_spools
    from knetlab.platform.tracking import client, ensure_experiment

    uri = tracking_db(tmp_path)
    mlflow = client(uri)
    experiment_id = ensure_experiment("spools", uri)
    storage = str(tmp_path / "ckpt")
    spools = {}
    for trial_id in ("00000", "00001"):
        run_id = mlflow.create_run(experiment_id).info.run_id
        spool_dir = run_spool_dir(storage, f"sweep-1-{trial_id}")
        spool_dir.mkdir(parents=True)
        record = {"run": run_id, "kind": "metrics", "step": 10, "timestamp": 1, "metrics": {"val/mIoU": 3.5}}
        (spool_dir / SPOOL_FILE).write_text(json.dumps(record) + "\n")
        spools[trial_id] = (run_id, spool_dir / SPOOL_FILE)
    assert spools["00000"][1].parent == tmp_path / "mlflow-spool" / "sweep-1-00000"  # beside the checkpoints

    # 00000 was stopped by the scheduler; 00001 is still running (its own logger owns the spool)
    assert deliver_leftover_spools([("00000", "TERMINATED"), ("00001", "RUNNING")], "sweep-1", storage, uri) == 1
    stopped, running = spools["00000"], spools["00001"]
    assert [(m.step, m.value) for m in mlflow.get_metric_history(stopped[0], "val/mIoU")] == [(10, 3.5)]
    assert not stopped[1].exists()
    assert running[1].exists() and mlflow.get_metric_history(running[0], "val/mIoU") == []


def test_the_end_of_a_run_sends_its_leftover_spool_before_marking_the_run(tmp_path: Path) -> None:
    """A run that ends while MLflow is down leaves its last records in rank 0's spool (its logger gives up 30 s
    after training): the driver sends them when it ends the run, then marks the run."""
    import json

    from knetlab.platform.config import load_config
    from knetlab.platform.run_spool import SPOOL_FILE, run_spool_dir
    from knetlab.platform.tracking import client, ensure_experiment
    from knetlab.platform.trainer import end_mlflow_run

    uri = tracking_db(tmp_path)
    run_id = client(uri).create_run(ensure_experiment("ended", uri)).info.run_id
    cfg = load_config(SMOKE, [f"storage.uri={tmp_path / 'ckpt'}"])
    spool = run_spool_dir(cfg.storage.uri, "run-1") / SPOOL_FILE
    spool.parent.mkdir(parents=True)
    spool.write_text(json.dumps({"run": run_id, "kind": "metrics", "step": 30, "timestamp": 1,
                                 "metrics": {"train/loss": 0.5}}) + "\n")

    end_mlflow_run({"tracking_uri": uri, "run_id": run_id}, RuntimeError("worker failed"), cfg, "run-1")
    run = client(uri).get_run(run_id)
    assert [(m.step, m.value) for m in client(uri).get_metric_history(run_id, "train/loss")] == [(30, 0.5)]
    assert run.info.status == "FAILED" and not spool.exists()
