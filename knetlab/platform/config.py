"""The experiment config: YAML files that may extend a base file, `key=value` overrides, the checks that reject a bad
config (one line naming the key and the valid values) before any worker starts, and the resolved config as YAML and
as flat params. The schema's dataclasses are in config_schema.py, the typed merge with its errors in
structured_config.py; their public names are importable from here."""

from __future__ import annotations

import difflib
import itertools
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knetlab.platform.config_schema import (
    EVAL_MODES,
    PLACEMENT_STRATEGIES,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    StorageConfig,
    TrackingConfig,
    TrainerConfig,
)
from knetlab.platform.dataset_config import settle_dataset
from knetlab.platform.structured_config import (
    ConfigError,
    apply_mapping,
    field_names,
    first_line,
    nest,
    parse_override,
    read_yaml_mapping,
)
from knetlab.redact import CREDENTIALS_BELONG, has_userinfo, redact  # the one redaction; `redact` importable here

__all__ = [
    "EVAL_MODES",
    "PLACEMENT_STRATEGIES",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainerConfig",
    "config_from_container",
    "config_to_yaml",
    "flatten_config",
    "load_config",
    "merge_overrides",
    "redact",
    "validate_config",
]

BASE_KEY = "base"  # `base: other.yaml` in an experiment file extends that file (path relative to the file)

# Kernel-generating heads with BatchNorm on a 1x1 pooled map (PSP's pyramid, ASPP's image pool, UPerNet's PPM):
# one image per BatchNorm fails in training ("Expected more than 1 value per channel").
POOLING_HEADS = ("psp", "aspp", "upernet")
# ModelSpec fields that have their own key in the model section, hence not allowed in model.overrides.
MODEL_FIELDS_OUTSIDE_OVERRIDES = ("num_classes", "pretrained", "drop_path_rate")
MIN_CROP_SIZE = 32  # the backbones' min_input_size: below it the stride-32 feature map is empty


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The validated, read-only config of an experiment YAML (after its `base:` chain) with `key=value` overrides."""
    cfg = OmegaConf.structured(ExperimentConfig)
    origins: dict[str, str] = {}
    for file_path, data in _read_base_chain(Path(path)):
        apply_mapping(cfg, data, str(file_path), origins, ExperimentConfig)
    _apply_overrides(cfg, overrides, origins)
    return _finish(cfg, str(path), origins)


def merge_overrides(cfg: DictConfig, *layers: Sequence[str] | Mapping[str, Any], source: str = "override",
                    seed_offset: int = 0) -> DictConfig:
    """A new config: `cfg` with each layer applied in order (`key=value` strings, or a `{dotted.key: value}` mapping
    whose errors name `source`), then `trainer.seed` moved on by `seed_offset` (a sweep's repeats count from the seed
    the layers leave), validated once as a whole (a later layer may make an earlier one valid)."""
    new_cfg = OmegaConf.structured(ExperimentConfig)
    origins: dict[str, str] = {}
    apply_mapping(new_cfg, OmegaConf.to_container(cfg, resolve=True), "config", origins, ExperimentConfig)
    for layer in layers:
        if isinstance(layer, Mapping):
            for key, value in layer.items():
                apply_mapping(new_cfg, nest(str(key), value), f"{source} {key}={value!r}", origins, ExperimentConfig)
        else:
            _apply_overrides(new_cfg, layer, origins)
    if seed_offset:
        new_cfg.trainer.seed += seed_offset
    return _finish(new_cfg, source, origins)


def config_from_container(data: Mapping[str, Any], source: str = "config") -> DictConfig:
    """A validated, read-only config from a plain mapping (e.g. the resolved config saved in a checkpoint)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(field_names(ExperimentConfig))}), "
                          f"got {type(data).__name__}")
    cfg = OmegaConf.structured(ExperimentConfig)
    origins: dict[str, str] = {}
    apply_mapping(cfg, data, source, origins, ExperimentConfig)
    return _finish(cfg, source, origins)


def _finish(cfg: DictConfig, source: str, origins: dict[str, str]) -> DictConfig:
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{origins.get(key, source)}: {key}: cannot resolve interpolation: "
                          f"{first_line(error)}") from None
    refuse_credentials_in_uris(cfg, source, origins)  # before a classes file is read from one
    settle_dataset(cfg, source, origins)  # the dataset's classes, model.num_classes, data.reduce_zero_label
    validate_config(cfg, source, origins)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _read_base_chain(path: Path) -> list[tuple[Path, dict]]:
    """[(file, its mapping without `base`)] from the root base file down to `path`."""
    chain: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    current: Path | None = path
    while current is not None:
        resolved = current.resolve()
        if resolved in seen:
            cycle = " -> ".join(str(p) for p in [*seen, resolved])
            raise ConfigError(f"{current}: base files form a cycle: {cycle}")
        seen.append(resolved)
        data = read_yaml_mapping(current, "config file", [*field_names(ExperimentConfig), BASE_KEY])
        base = data.pop(BASE_KEY, None)
        chain.append((current, data))
        if base is None:
            current = None
        elif isinstance(base, str) and base.strip():
            current = current.parent / base
            if not current.is_file():
                raise ConfigError(f"{chain[-1][0]}: base: file {current} does not exist")
        else:
            raise ConfigError(f"{chain[-1][0]}: base: expected the path of another YAML file, got {base!r}")
    return list(reversed(chain))


def _apply_overrides(cfg: DictConfig, overrides: Iterable[str], origins: dict[str, str]) -> None:
    for item in overrides:
        key, value = parse_override(item)
        if key == BASE_KEY:
            raise ConfigError(f"override {item!r}: base can only be set inside a YAML file")
        apply_mapping(cfg, nest(key, value), f"override {item!r}", origins, ExperimentConfig)


# ---------------------------------------------------------------------------------------------------------------
# Validation (values that have the right type but cannot work)


def loader_workers(cfg: DictConfig) -> int:
    """The DataLoader processes of each Ray worker: data.num_workers, or when null every CPU of the worker but the
    one its training process keeps (trainer.cpus_per_worker - 1; 0 loads in the training process)."""
    if cfg.data.num_workers is not None:
        return int(cfg.data.num_workers)
    return max(int(cfg.trainer.cpus_per_worker) - 1, 0)


def validate_config(cfg: DictConfig, source: str = "config", origins: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for the first value that cannot work, naming the key (and the file or override that set
    it, from `origins`) and the valid values."""

    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{(origins or {}).get(key, source)}: {key}: {message}")

    def positive(key: str, value: float | None, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            fail(key, f"must be > 0, got {value}")

    def pair_positive(key: str, value: Sequence[float]) -> None:
        if any(v <= 0 for v in value):
            fail(key, f"both values must be > 0, got {list(value)}")

    m, d, o, s, t, st, tr, e = (cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.trainer, cfg.storage,
                                cfg.tracking, cfg.eval)
    refuse_credentials_in_uris(cfg, source, origins)

    spec = _model_spec(m.name, dict(m.overrides), fail)
    if m.num_classes is not None and not 1 <= m.num_classes <= 255:
        fail("model.num_classes", f"must be between 1 and 255 (255 is the ignore label), got {m.num_classes}")
    if m.drop_path_rate is not None and not 0.0 <= m.drop_path_rate < 1.0:
        fail("model.drop_path_rate", f"must be null (the model's default) or in [0, 1), got {m.drop_path_rate}")
    if m.init_checkpoint is not None and not m.init_checkpoint.strip():
        fail("model.init_checkpoint", "must be null or a local path / s3:// URI, got an empty string")
    from knetlab.models.weights import setting_problem  # the zoo's package imports torch: not at the top

    if problem := setting_problem(m.pretrained, m.pretrained_sha256):
        fail(*problem)
    if not m.cache_dir.strip():
        fail("model.cache_dir", "must be a local directory, got an empty string")

    for key, value in (("data.root", d.root), ("data.cache_dir", d.cache_dir)):
        if not value.strip():
            fail(key, "must be a local path or s3:// URI, got an empty string")
    positive("data.crop_size", d.crop_size)
    pair_positive("data.scale", d.scale)
    if not 0 < d.ratio_range[0] <= d.ratio_range[1]:
        fail("data.ratio_range", f"must be [low, high] with 0 < low <= high, got {list(d.ratio_range)}")
    if not 0 < d.cat_max_ratio <= 1:
        fail("data.cat_max_ratio", f"must be in (0, 1] (1 = no constraint), got {d.cat_max_ratio}")
    positive("data.batch_size", d.batch_size)
    if d.num_workers is not None and d.num_workers < 0:
        fail("data.num_workers", f"must be >= 0 (0 = load in the training process) or null (trainer.cpus_per_worker "
                                 f"- 1), got {d.num_workers}")
    positive("data.prefetch_factor", d.prefetch_factor)
    positive("data.val_max_images", d.val_max_images, allow_none=True)
    if d.multiscale and (len(d.multiscale) != 2 or any(len(pair) != 2 or min(pair) <= 0 for pair in d.multiscale)):
        fail("data.multiscale", f"must be empty or two [long, short] scales of positive sizes, e.g. "
                                f"[[1333, 640], [1333, 800]], got {OmegaConf.to_container(d.multiscale)}")
    if d.synthesize and d.root.startswith("s3://"):
        fail("data.synthesize", f"can only generate a local dataset, but data.root is {d.root}")

    positive("optim.lr", o.lr)
    if o.weight_decay < 0:
        fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not all(0 <= b < 1 for b in o.betas):
        fail("optim.betas", f"both values must be in [0, 1), got {list(o.betas)}")
    positive("optim.eps", o.eps)
    if any(not k for k in o.no_decay_keys):
        fail("optim.no_decay_keys", "an empty substring would match every parameter")
    for key, mult in o.lr_mult_keys.items():
        if not key or mult < 0:
            fail(f"optim.lr_mult_keys.{key}", f"must be a non-empty substring with a multiplier >= 0, got {mult}")
    positive("optim.clip_grad_norm", o.clip_grad_norm, allow_none=True)

    positive("trainer.max_iters", t.max_iters)
    for key in ("eval_interval", "checkpoint_interval", "log_interval"):
        positive(f"trainer.{key}", t[key])
    positive("trainer.num_workers", t.num_workers)
    positive("trainer.cpus_per_worker", t.cpus_per_worker)
    if t.bench_images < 0:
        fail("trainer.bench_images", f"must be >= 0 (0: no benchmark after training), got {t.bench_images}")
    if t.max_failures < -1:
        fail("trainer.max_failures", f"must be >= 0, or -1 for unlimited retries, got {t.max_failures}")
    if t.placement_strategy not in PLACEMENT_STRATEGIES:
        fail("trainer.placement_strategy", f"{t.placement_strategy!r} is not one of {', '.join(PLACEMENT_STRATEGIES)}")

    if s.warmup_iters < 0:
        fail("schedule.warmup_iters", f"must be >= 0, got {s.warmup_iters}")
    if not 0 < s.warmup_ratio <= 1:
        fail("schedule.warmup_ratio", f"must be in (0, 1], got {s.warmup_ratio}")
    if not 0 < s.gamma <= 1:
        fail("schedule.gamma", f"must be in (0, 1], got {s.gamma}")
    milestones = list(s.milestones)
    if any(b <= a for a, b in itertools.pairwise(milestones)) or any(x <= 0 for x in milestones):
        fail("schedule.milestones", f"must be positive and strictly increasing, got {milestones}")
    if milestones and milestones[-1] > t.max_iters:
        fail("schedule.milestones", f"{milestones} go beyond trainer.max_iters={t.max_iters}: every milestone must "
                                    f"be <= max_iters (set schedule.milestones=[...] or [] for no decay)")

    if st.num_to_keep < 1:
        fail("storage.num_to_keep", f"must be >= 1, got {st.num_to_keep}")
    if not st.uri.strip():
        fail("storage.uri", "must be a local path or s3://bucket/prefix, got an empty string")
    if not tr.experiment.strip():
        fail("tracking.experiment", "must be a non-empty MLflow experiment name")
    if tr.system_metrics_interval < 0:
        fail("tracking.system_metrics_interval", f"must be >= 0 seconds (0: none), got {tr.system_metrics_interval}")
    if tr.delivery_timeout_s < 0:
        fail("tracking.delivery_timeout_s", f"must be >= 0 seconds, got {tr.delivery_timeout_s}")

    if e.mode not in EVAL_MODES:
        fail("eval.mode", f"must be one of {', '.join(EVAL_MODES)}, got {e.mode!r}")
    pair_positive("eval.crop", e.crop)
    pair_positive("eval.stride", e.stride)
    pair_positive("eval.test_scale", e.test_scale)
    if e.mode == "slide" and any(st_ > c for st_, c in zip(e.stride, e.crop)):
        fail("eval.stride", f"{list(e.stride)} is larger than eval.crop {list(e.crop)}: windows would skip pixels")
    if not e.ms_ratios or any(r <= 0 for r in e.ms_ratios):
        fail("eval.ms_ratios", f"must be a non-empty list of positive ratios, got {list(e.ms_ratios)}")
    if min(e.test_scale) < MIN_CROP_SIZE:
        fail("eval.test_scale", f"{list(e.test_scale)}: images resized within it would be below the "
                                f"{MIN_CROP_SIZE} pixels every backbone needs")
    if min(e.test_scale) * min(e.ms_ratios) < MIN_CROP_SIZE:
        fail("eval.ms_ratios", f"{min(e.ms_ratios)} x eval.test_scale {list(e.test_scale)} resizes images below the "
                               f"{MIN_CROP_SIZE} pixels every backbone needs")

    if d.crop_size < MIN_CROP_SIZE:
        fail("data.crop_size", f"{d.crop_size} is below the {MIN_CROP_SIZE} pixels every backbone needs "
                               f"(its deepest feature map would be empty)")
    divisor = getattr(spec, "crop_divisor", 1)  # panoptic/instance models pad to 32 instead of cropping
    if divisor > 1:
        if d.crop_size % divisor:
            fail("data.crop_size", f"{d.crop_size} is not a multiple of {divisor}, which model {m.name} "
                                   f"({spec.backbone}) needs; e.g. {_round_to(d.crop_size, divisor)}")
        if e.mode == "slide" and any(c % divisor for c in e.crop):
            fail("eval.crop", f"{list(e.crop)} is not a multiple of {divisor}, which model {m.name} needs")

    images_per_batchnorm = d.batch_size * (t.num_workers if m.sync_bn else 1)
    if images_per_batchnorm < 2 and getattr(spec, "head", None) in POOLING_HEADS:
        fail("data.batch_size", f"{d.batch_size} image(s) per BatchNorm ({t.num_workers} worker(s), "
                                f"model.sync_bn={m.sync_bn}) fails in training for model {m.name}'s {spec.head} "
                                f"head (BatchNorm after 1x1 pooling): use data.batch_size >= 2 or "
                                f"model.sync_bn=true with trainer.num_workers >= 2")


URI_KEYS_WITHOUT_CREDENTIALS = ("storage.uri", "data.root", "data.classes_file", "model.pretrained",
                                "model.init_checkpoint")


def refuse_credentials_in_uris(cfg: DictConfig, source: str = "config", origins: Mapping[str, str] | None = None
                               ) -> None:
    """A URI with credentials in it (`s3://key:secret@bucket/x`) is refused in one line that names the key, repeats
    no secret (the file or override that set it is redacted too) and says where credentials belong."""
    for key in URI_KEYS_WITHOUT_CREDENTIALS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and has_userinfo(value):
            origin = redact((origins or {}).get(key, source))
            raise ConfigError(f"{origin}: {key}: credentials in the URI are refused ({redact(value)}): "
                              f"{CREDENTIALS_BELONG}")


def _model_spec(name: str, overrides: dict[str, Any], fail: typing.Callable[[str, str], typing.NoReturn]) -> Any:
    """The zoo's ModelSpec of `name` with model.overrides applied (imported here, not at the top: the model zoo
    imports torch and timm)."""
    from knetlab.models import ModelError, list_models
    from knetlab.models.zoo import model_spec, spec_fields

    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        fail("model.name", f"unknown model {name!r}{hint} (valid: {', '.join(names)})")
    fields = spec_fields(name)
    valid = [f for f in fields if f not in MODEL_FIELDS_OUTSIDE_OVERRIDES]
    for key in overrides:
        if key in MODEL_FIELDS_OUTSIDE_OVERRIDES:
            fail(f"model.overrides.{key}", f"set model.{key} instead")
        if key not in fields:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean model.overrides.{close[0]}?" if close else ""
            fail(f"model.overrides.{key}", f"not a model option{hint} (valid: {', '.join(valid)})")
    try:
        return model_spec(name, **overrides)
    except ModelError as error:
        fail("model.overrides", str(error))


def _round_to(value: int, divisor: int) -> int:
    return max(divisor, round(value / divisor) * divisor)


# ---------------------------------------------------------------------------------------------------------------
# Output: YAML, flattened params, the resolved config saved with every run


def _redact_container(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _redact_container(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_redact_container(v) for v in data]
    if isinstance(data, str):
        return redact(data)
    return data


def config_to_yaml(cfg: DictConfig, redact_secrets: bool = True) -> str:
    """The resolved config as YAML (loadable again with load_config), secrets in URIs redacted by default."""
    data = OmegaConf.to_container(cfg, resolve=True)
    if redact_secrets:
        data = _redact_container(data)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def flatten_config(cfg: DictConfig) -> dict[str, Any]:
    """{"optim.lr": 0.0001, ...}: the resolved config as flat params (MLflow), secrets redacted; lists as text."""
    flat: dict[str, Any] = {}

    def walk(data: Any, prefix: str) -> None:
        if isinstance(data, dict) and (data or not prefix):
            for key, value in data.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(data) if isinstance(data, (list, tuple, dict)) else data

    walk(_redact_container(OmegaConf.to_container(cfg, resolve=True)), "")
    return flat

