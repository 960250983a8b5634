"""Two workers with batch b make the same parameter update as one worker with batch 2b on the same samples: proof
that knetlab's Ray Train loop synchronises gradients (DDP over gloo on CPU)."""

from pathlib import Path

import pytest
import torch
from conftest import tracking_db

from knetlab.data.synthetic import generate_synthetic_ade20k
from knetlab.platform.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _one_step(tmp_path: Path, data_root: Path, name: str, num_workers: int, batch_size: int) -> dict:
    from knetlab.platform.trainer import run_training

    cfg = load_config(REPO / "experiments" / "smoke.yaml", [
        f"data.root={data_root}", "data.synthesize=false", f"data.batch_size={batch_size}", "data.num_workers=0",
        f"trainer.num_workers={num_workers}", "trainer.max_iters=1", "trainer.eval_interval=1",
        "trainer.checkpoint_interval=1", "trainer.log_interval=1", "schedule.warmup_iters=0", "schedule.milestones=[]",
        # BatchNorm frozen and dropout off: the forward pass must not depend on how the batch is split.
        "model.norm_eval=true", "model.overrides.dropout_ratio=0.0",
        # With eps far above |grad|, Adam's first step is ~ lr * grad / eps: linear in the gradient, so a worker
        # that used only its own half-batch gradient would move its parameters measurably differently.
        "optim.lr=1.0", "optim.eps=1000.0", "optim.weight_decay=0.0", "optim.clip_grad_norm=null",
        f"storage.uri={tmp_path / 'ckpt'}", f"tracking.uri={tracking_db(tmp_path)}",
        f"tracking.run_name={name}", "data.val_max_images=1",
    ])
    run_training(cfg)
    (checkpoint,) = sorted((tmp_path / "ckpt" / name).glob("checkpoint_0*"))
    return torch.load(checkpoint / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_batch_b_equal_one_worker_batch_2b(tmp_path: Path) -> None:
    import ray

    from knetlab.models import create_model

    data_root = tmp_path / "data"
    generate_synthetic_ade20k(data_root, num_train=16, num_val=2)
    try:
        two = _one_step(tmp_path, data_root, "two-workers", num_workers=2, batch_size=2)
        one = _one_step(tmp_path, data_root, "one-worker", num_workers=1, batch_size=4)
    finally:
        ray.shutdown()

    torch.manual_seed(0)  # the loop seeds rank 0 (whose weights DDP broadcasts) with trainer.seed + 0 = 0
    initial = create_model("tiny", dropout_ratio=0.0).state_dict()
    moved = 0
    for key, value in initial.items():
        if not value.is_floating_point() or "running_" in key:
            continue
        delta_one, delta_two = one[key] - value, two[key] - value
        torch.testing.assert_close(delta_two, delta_one, rtol=1e-3, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
        moved += int(delta_one.abs().max() > 1e-6)
    assert moved > 10, "the step barely moved the parameters: the comparison would prove nothing"
