"""The experiment config's structured schema: one dataclass per section (`model`, `data`, `optim`, `schedule`,
`trainer`, `storage`, `tracking`, `eval`) with its defaults and types; config.py loads, merges and validates it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = "tiny"  # a name from knetlab.models.list_models()
    num_classes: int | None = None  # null: the dataset's class count (ADE20K's 150 when it names no classes)
    # Backbone ImageNet weights: an https:// URL or s3:// URI (fetched once per node into model.cache_dir), a local
    # path, null (the zoo model's reference weights: every table row starts from them; none for the tiny models) or
    # `none` (random initialisation: a table row trained from scratch, asked for explicitly)
    pretrained: str | None = None
    # The sha256 of that file: 64 hex digits or a prefix of 8+ (open-mmlab and torchvision put the first 8 in their
    # file names); null: not known (nothing is checked; `knetlab train` prints and logs the file's digest)
    pretrained_sha256: str | None = None
    cache_dir: str = "~/.cache/knetlab/weights"  # this node's copy of remote weights (a local filesystem)
    init_checkpoint: str | None = None  # full knetlab (or converted mmseg) weights to start from
    drop_path_rate: float | None = None  # None = the model's default
    sync_bn: bool = True
    norm_eval: bool = False  # keep BatchNorm layers in eval mode while training (mmseg's norm_eval)
    # Other ModelSpec fields of the zoo (knetlab.models.ModelSpec), e.g. {dropout_ratio: 0.0, channels: 256}
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    # Semantic models: a dir holding ADEChallengeData2016's layout; panoptic/instance models: a dir holding COCO's
    # (annotations/, train2017/, val2017/); either as a local path or s3://bucket/prefix.
    root: str = "runs/data/synthetic-ade20k"
    cache_dir: str = "runs/cache/datasets"
    # Semantic models: the dataset's classes in label order (knetlab/data/classes.py). Empty: data.classes_file, else
    # a classes.txt / classes.yaml in data.root, else ADE20K's 150. Settled when the config is loaded (names written
    # here).
    classes: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)  # [R, G, B] per class; empty: the file's, else generated
    classes_file: str | None = None  # classes.txt / .yaml: local path (from the working directory) or s3:// URI
    # Label encoding. true: annotation 0 = other (ignored), k = class k-1 (ADE20K); false: 0..N-1 = the classes,
    # 255 = ignored. null: true for ADE20K's classes, false for a dataset's own (unless its classes.yaml says).
    reduce_zero_label: bool | None = None
    # Files of "IMAGE LABEL" lines (paths relative to data.root, as these files are); null: ADE20K's folder layout.
    train_list: str | None = None
    val_list: str | None = None
    crop_size: int = 512  # semantic models: the training crop
    # (long, short) side the training image is resized into (semantic: then times ratio_range; COCO: as is).
    scale: tuple[int, int] = (2048, 512)
    # Panoptic/instance only: two (long, short) scales; each training image's scale is drawn between them (mmdet's
    # 'range' multiscale of the ms-3x recipes, e.g. [[1333, 640], [1333, 800]]). Empty: data.scale.
    multiscale: list[list[int]] = field(default_factory=list)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    batch_size: int = 2  # per Ray worker
    # DataLoader processes per Ray worker; null = trainer.cpus_per_worker - 1 (see `config.loader_workers`)
    num_workers: int | None = None
    prefetch_factor: int = 2  # batches each loader process prepares ahead
    # GPU training: batches in page-locked (pinned) host memory, so their non_blocking copies to the GPU overlap the
    # previous step's compute (from pageable memory the copy waits). No effect on CPU.
    pin_memory: bool = True
    val_max_images: int | None = None
    synthesize: bool = False  # generate the synthetic dataset at data.root if it is missing (smoke/demo only)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    no_decay_keys: list[str] = field(default_factory=list)  # substring rules: parameters whose name contains one
    # Per-parameter LR multipliers by substring of the parameter name, as mmcv's `paramwise_cfg.custom_keys` lr_mult
    # (the longest matching key wins), e.g. {backbone: 0.25} for the COCO recipes; the schedule scales every group
    lr_mult_keys: dict[str, float] = field(default_factory=dict)
    clip_grad_norm: float | None = 1.0


@dataclass
class ScheduleConfig:
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    milestones: list[int] = field(default_factory=lambda: [60000, 72000])
    gamma: float = 0.1


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies


@dataclass
class TrainerConfig:
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_iters: int = 80000
    eval_interval: int = 8000
    checkpoint_interval: int = 8000
    log_interval: int = 50
    seed: int = 0
    # Automatic mixed precision on GPUs: bf16 from compute capability 8.0 (Ampere) on, fp16 with a GradScaler below
    # (V100, T4); no effect on CPU. The reference trained in float32.
    amp: bool = False
    # GPU fast paths (docs/performance.md, "GPU fast paths"); each keeps the model's numbers up to rounding.
    tf32: bool = True  # TF32 float32 matmuls and convolutions on Ampere and later; false: IEEE float32 (V100-like)
    # cuDNN autotunes the convolutions for the fixed training crop (semantic models; COCO images vary in size), as
    # the reference trained; off during validation and benchmarks.
    cudnn_benchmark: bool = True
    channels_last: bool = False  # NHWC memory format for the model's convolutions (tensor cores prefer it)
    compile: bool = False  # torch.compile the training model (minutes of compilation at the start of every run)
    max_failures: int = 0
    # How Ray places the workers: PACK (default: fill a node first; a worker may land on another node when this one is
    # full), SPREAD, STRICT_PACK (all on one node or none: the table's 8-GPU rows), STRICT_SPREAD (one per node).
    placement_strategy: str = "PACK"
    # After training, rank 0 measures inference fps on this many images at eval.test_scale (batch 1, as
    # mmsegmentation's benchmark; 0: skip) and logs bench/fps with bench/mem_gb, the peak memory of training (the
    # largest worker's, validation excluded): the table's "Inf time (fps)" and "Mem (GB)" columns in `knetlab compare`.
    bench_images: int = 0


@dataclass
class StorageConfig:
    uri: str = "runs/checkpoints"  # local path or s3://bucket/prefix
    num_to_keep: int = 2  # best by val/mIoU + last


@dataclass
class TrackingConfig:
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db
    experiment: str = "knetlab"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # At the end of a successful run, log its best checkpoint as an MLflow model (runs:/RUN_ID/model). Costs a few
    # seconds (the smoke experiments turn it off); `knetlab register` logs it later when it is off.
    log_model: bool = True
    # Seconds between rank 0's samples of CPU/memory/GPU use, logged as MLflow's system/* metrics; 0 = none.
    system_metrics_interval: float = 10.0
    # Seconds the end of a run waits for an MLflow server that does not answer (rank 0, then the driver once more)
    # before leaving the records it could not send in the run's spool, which the run's next leg (--resume) sends.
    delivery_timeout_s: float = 30.0


EVAL_MODES = ("whole", "slide")


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    test_scale: tuple[int, int] = (2048, 512)
    ms_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    flip: bool = True
    # After training, evaluate once more with multi-scale + flip (ms_ratios, flip) and log val/mIoU_msflip: the
    # mIoU(ms+flip) column of `knetlab compare` (semantic models; the table sweeps set it).
    final_ms_flip: bool = False


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

