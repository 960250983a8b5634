"""A dataset of your own through the semantic family, without Ray: the example experiment builds its datasets and
model and takes a training step; validation's per-class metrics, CSV, confusion matrix and overlay legend use the
dataset's names; `knetlab eval` prints and logs them and refuses a checkpoint trained on other classes. (The Ray
end-to-end run on a 5-class dataset is tests/test_train_e2e.py's two-worker run.)"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tracking_db
from omegaconf import OmegaConf
from PIL import Image

from knetlab.data import collate_segmentation, generate_synthetic_custom
from knetlab.evaluation.visualize import overlay_png
from knetlab.models import build_segmentor
from knetlab.platform import semantic_task
from knetlab.platform.config import load_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "experiments" / "custom" / "example.yaml"
NAMES = ("sky", "meadow", "pond", "kite", "traffic cone")


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    return generate_synthetic_custom(tmp_path / "mine", num_train=4, num_val=2, min_side=40, max_side=72)


def test_example_experiment_trains_on_its_own_classes(dataset_root: Path):
    cfg = load_config(EXAMPLE, [f"data.root={dataset_root}", "data.train_list=train.txt", "data.val_list=val.txt"])
    assert tuple(cfg.data.classes) == NAMES and cfg.model.num_classes == 5 and cfg.data.reduce_zero_label is False
    assert cfg.trainer.use_gpu is False and cfg.model.name == "tiny"
    semantic_task.prepare_data(cfg)  # the driver's up-front checks, list files included
    train = semantic_task.train_dataset(cfg)
    assert train.classes == NAMES and len(train) == 4
    batch = collate_segmentation([train[0], train[1]])
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    torch.manual_seed(0)
    model = build_segmentor(cfg.model, load_weights=False).train()
    losses = semantic_task.batch_losses(model, batch, torch.device("cpu"))
    assert losses and all(torch.isfinite(loss) for loss in losses.values())
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape[1] == 5


def test_validation_names_metrics_csv_confusion_and_overlays(dataset_root: Path, tmp_path: Path):
    cfg = load_config(EXAMPLE, [f"data.root={dataset_root}"])
    torch.manual_seed(0)
    model = build_segmentor(cfg.model, load_weights=False)
    artifacts = tmp_path / "artifacts"
    validation = semantic_task.validate(model, semantic_task.val_dataset(cfg), cfg, torch.device("cpu"), 0, 1,
                                        artifacts)
    assert validation.details and {key.removeprefix("val/IoU/") for key in validation.details} <= set(NAMES)
    with open(artifacts / "per_class_iou.csv") as f:
        assert [row["class"] for row in csv.DictReader(f)] == list(NAMES)
    assert (artifacts / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    with Image.open(artifacts / "overlay_0.png") as overlay:
        grid_height = semantic_task.val_dataset(cfg)[0]["image"].shape[1]
        assert overlay.height > grid_height  # the legend below the image row


def test_overlay_legend_shows_the_classes_present_in_their_colours(tmp_path: Path):
    palette = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    images = torch.full((1, 3, 8, 12), -3.0)  # black after denormalisation
    preds = torch.zeros(1, 8, 12, dtype=torch.long)
    preds[0, :, 6:] = 2
    labels = torch.full((1, 8, 12), 255)
    with_names = np.array(Image.open(overlay_png(images, preds, labels, palette, tmp_path / "a.png",
                                                 class_names=["road", "grass", "water"])))
    without = np.array(Image.open(overlay_png(images, preds, labels, palette, tmp_path / "b.png")))
    assert with_names.shape[0] > without.shape[0] and with_names.shape[1] == without.shape[1]
    colours = {tuple(c) for c in with_names.reshape(-1, 3)}
    assert palette[0] in colours and palette[2] in colours  # swatches of the classes present, unblended
    assert palette[1] not in colours  # grass is in neither the prediction nor the ground truth
    with pytest.raises(ValueError, match="2 class names for 3 palette colours"):
        overlay_png(images, preds, labels, palette, tmp_path / "c.png", class_names=["a", "b"])


def test_a_classes_file_the_config_did_not_read_stops_training(tmp_path: Path):
    from knetlab.data import DatasetError, generate_synthetic_ade20k

    root = generate_synthetic_ade20k(tmp_path / "ade", num_train=1, num_val=1, image_size=(32, 32)).parent
    cfg = load_config(REPO / "experiments" / "smoke.yaml", [f"data.root={root}", "data.synthesize=false"])
    semantic_task.check_classes_beside_data(cfg)  # ADE20K's classes, no file: fine
    # e.g. an s3:// dataset's classes.txt, only seen in the local copy after the config was settled
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match=r"classes\.txt: the dataset names its 2 classes here, but the config "
                                           r"uses ADE20K's 150; set data\.classes_file"):
        semantic_task.check_classes_beside_data(cfg)


def write_checkpoint(directory: Path, cfg) -> None:
    from knetlab.platform.checkpoint import save_checkpoint
    from knetlab.platform.optim import build_lr_scheduler, build_optimizer

    torch.manual_seed(0)
    model = build_segmentor(cfg.model, load_weights=False)
    optimizer = build_optimizer(model, cfg.optim)
    save_checkpoint(directory, rank=0, model=model, optimizer=optimizer,
                    scheduler=build_lr_scheduler(optimizer, cfg.schedule), scaler=None, iteration=7, epoch=0,
                    metrics={}, config_yaml=OmegaConf.to_yaml(cfg), mlflow_run_id=None)


def test_eval_prints_and_logs_the_dataset_names(dataset_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from knetlab.platform import tracking
    from knetlab.platform.checkpoint import CheckpointError
    from knetlab.platform.eval_checkpoint import evaluate_checkpoint, log_evaluation

    cfg = load_config(EXAMPLE, [f"data.root={dataset_root}"])
    write_checkpoint(tmp_path / "ckpt", cfg)
    outcome = evaluate_checkpoint(cfg, str(tmp_path / "ckpt"))
    table = capsys.readouterr().out
    assert outcome["class_names"] == NAMES and all(f"\n{name} " in table for name in NAMES)

    uri = tracking_db(tmp_path)
    client = tracking.client(uri)
    run_id = client.create_run(tracking.ensure_experiment("eval-custom", uri)).info.run_id
    log_evaluation(uri, run_id, 7, outcome)
    table_file = Path(client.download_artifacts(run_id, "eval/per_class_iou_iter7.csv", str(tmp_path)))
    assert [line.split(",")[1] for line in table_file.read_text().splitlines()[1:]] == list(NAMES)

    renamed = load_config(EXAMPLE, [f"data.root={dataset_root}", "data.classes=[a,b,c,d,e]"])
    with pytest.raises(CheckpointError, match=r"trained on the classes \[sky, meadow, pond, kite, traffic cone\] "
                                              r"but the dataset's are \[a, b, c, d, e\]"):
        evaluate_checkpoint(renamed, str(tmp_path / "ckpt"))
