"""The experiment config: schema, base files, overrides, validation errors, the resolved config round trip, and
every experiment YAML in the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from knetlab.models import MODELS, list_models
from knetlab.models.weights import REFERENCE_WEIGHTS
from knetlab.platform.config import (
    ConfigError,
    ExperimentConfig,
    config_from_container,
    config_to_yaml,
    flatten_config,
    load_config,
    merge_overrides,
    redact,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_FILES = sorted(p for p in (REPO_ROOT / "experiments").rglob("*.yaml") if "sweeps" not in p.parts)
# Valid for every model: small, a multiple of 32, two images per BatchNorm, milestones within max_iters.
SMALL = ["data.crop_size=64", "trainer.max_iters=100", "schedule.milestones=[50]"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def swin_model() -> str:
    names = [n for n in list_models() if "swin" in n]
    assert names, f"the model zoo has no Swin model: {list_models()}"
    return names[0]


def pooling_head_models() -> list[str]:
    names = [n for n in list_models() if any(head in n for head in ("upernet", "psp", "deeplabv3", "aspp"))]
    assert names, f"the model zoo has no PSP/ASPP/UperNet model: {list_models()}"
    return names


def config_error(path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"error messages are one line: {message!r}"
    return message


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    return write(tmp_path / "exp.yaml", "model:\n  name: tiny\ndata:\n  crop_size: 64\ntrainer:\n  max_iters: 100\n"
                                        "schedule:\n  milestones: [50, 80]\n")


def test_defaults_follow_the_schema(experiment: Path):
    cfg = load_config(experiment)
    assert OmegaConf.get_type(cfg) is ExperimentConfig
    assert cfg.model.name == "tiny" and cfg.model.num_classes == 150 and cfg.model.sync_bn is True
    assert cfg.data.crop_size == 64 and list(cfg.data.scale) == [2048, 512] and cfg.data.batch_size == 2
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 5e-4 and cfg.optim.clip_grad_norm == 1.0
    assert cfg.schedule.warmup_iters == 1000 and list(cfg.schedule.milestones) == [50, 80]
    assert cfg.trainer.max_iters == 100 and cfg.trainer.eval_interval == 8000 and cfg.trainer.num_workers == 1
    assert cfg.storage.uri == "runs/checkpoints" and cfg.tracking.uri is None and cfg.eval.mode == "whole"


def test_config_is_read_only(experiment: Path):
    cfg = load_config(experiment)
    with pytest.raises(ReadonlyConfigError):
        cfg.optim.lr = 1.0


def test_overrides_are_typed_and_win_over_the_file(experiment: Path):
    cfg = load_config(experiment, ["optim.lr=3e-4", "trainer.max_iters=200", "data.scale=[256,64]",
                                   "model.drop_path_rate=0.2", "tracking.tags.team=seg", "trainer.amp=true"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.max_iters == 200 and list(cfg.data.scale) == [256, 64]
    assert cfg.model.drop_path_rate == pytest.approx(0.2) and cfg.trainer.amp is True
    assert dict(cfg.tracking.tags) == {"team": "seg"}
    # null sets an optional value back to None; the last override of a key wins
    cfg = load_config(experiment, ["model.drop_path_rate=0.2", "model.drop_path_rate=null", "trainer.seed=1",
                                   "trainer.seed=7"])
    assert cfg.model.drop_path_rate is None and cfg.trainer.seed == 7


def test_base_chain_extends_and_overrides(tmp_path: Path):
    write(tmp_path / "base.yaml", "model:\n  name: tiny\n  num_classes: 10\ndata:\n  crop_size: 64\n"
                                  "tracking:\n  experiment: family\n  tags: {dataset: synthetic}\n")
    write(tmp_path / "mid" / "mid.yaml", "base: ../base.yaml\noptim:\n  lr: 0.001\ntrainer:\n  max_iters: 500\n"
                                         "schedule:\n  milestones: [400]\n")
    leaf = write(tmp_path / "mid" / "leaf.yaml", "base: mid.yaml\nmodel:\n  num_classes: 5\n"
                                                 "tracking:\n  tags: {row: leaf}\n")
    cfg = load_config(leaf, ["optim.lr=0.002"])
    assert cfg.model.name == "tiny" and cfg.model.num_classes == 5  # the leaf wins over the root base
    assert cfg.data.crop_size == 64 and cfg.trainer.max_iters == 500 and list(cfg.schedule.milestones) == [400]
    assert cfg.optim.lr == pytest.approx(0.002) and cfg.tracking.experiment == "family"
    assert dict(cfg.tracking.tags) == {"dataset": "synthetic", "row": "leaf"}  # tag mappings merge
    assert "base" not in cfg


def test_base_errors_name_the_file(tmp_path: Path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "cycle" in config_error(a, [])
    missing = write(tmp_path / "m.yaml", "base: nowhere.yaml\n")
    message = config_error(missing, [])
    assert str(missing) in message and "nowhere.yaml" in message and "does not exist" in message
    bad = write(tmp_path / "bad.yaml", "base: [x]\n")
    assert "base" in config_error(bad, [])


def test_file_errors(tmp_path: Path):
    assert "does not exist" in config_error(tmp_path / "none.yaml", [])
    broken = write(tmp_path / "broken.yaml", "model: {name: tiny\n")
    message = config_error(broken, [])
    assert str(broken) in message and "YAML" in message
    listing = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "mapping" in config_error(listing, [])


def test_unknown_key_suggests_the_closest(experiment: Path):
    message = config_error(experiment, ["model.nmae=tiny"])
    assert "unknown key model.nmae" in message and "did you mean model.name?" in message
    assert "valid keys in model: name, num_classes" in message
    message = config_error(experiment, ["crop_size=32"])  # right key, wrong section
    assert "did you mean data.crop_size?" in message
    message = config_error(experiment, ["optim.lr_rate=1"])
    assert "did you mean optim.lr?" in message


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path):
    path = write(tmp_path / "typo.yaml", "model:\n  name: tiny\ntrainer:\n  max_iter: 10\n")
    message = config_error(path, [])
    assert message.startswith(str(path)) and "unknown key trainer.max_iter" in message
    assert "did you mean trainer.max_iters?" in message
    path = write(tmp_path / "section.yaml", "modle:\n  name: tiny\n")
    assert "did you mean model?" in config_error(path, [])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_iters=abc", "trainer.max_iters must be an integer, got 'abc'"),
        ("trainer.max_iters=2.5", "trainer.max_iters must be an integer"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("trainer.use_gpu=maybe", "trainer.use_gpu must be true or false"),
        ("data.scale=[1,2,3]", "data.scale must be a list of 2 integers"),
        ("data.scale=512", "data.scale must be a list of 2 integers"),
        ("optim.no_decay_keys=norm", "optim.no_decay_keys must be a list of strings"),
        ("model.num_classes=many", "model.num_classes must be an integer or null"),
        ("model=tiny", "model is a section with keys (name, num_classes"),
    ],
)
def test_wrong_type(experiment: Path, override: str, expected: str):
    message = config_error(experiment, [override])
    assert message.startswith(f"override {override!r}") and expected in message


def test_malformed_overrides(experiment: Path):
    assert "expected key=value" in config_error(experiment, ["trainer.max_iters"])
    assert "base can only be set inside a YAML file" in config_error(experiment, ["base=other.yaml"])


def test_unknown_model_lists_the_valid_ones(experiment: Path):
    message = config_error(experiment, ["model.name=knet-resnet-9000"])
    assert "model.name" in message and "'knet-resnet-9000'" in message
    assert "valid: " + ", ".join(list_models()) in message
    assert message.startswith("override 'model.name=knet-resnet-9000'")  # the override that set it


def test_crop_size_the_backbone_cannot_take(experiment: Path):
    swin = swin_model()
    message = config_error(experiment, [f"model.name={swin}", "data.crop_size=100"])
    assert "data.crop_size" in message and "multiple of 32" in message and swin in message
    assert load_config(experiment, [f"model.name={swin}", "data.crop_size=96"]).data.crop_size == 96
    message = config_error(experiment, ["data.crop_size=16"])
    assert "data.crop_size" in message and "below the 32 pixels" in message
    message = config_error(experiment, [f"model.name={swin}", "eval.mode=slide", "eval.crop=[100,100]",
                                        "eval.stride=[50,50]"])
    assert "eval.crop" in message and "multiple of 32" in message


@pytest.mark.parametrize("name", pooling_head_models())
def test_batch_of_one_with_a_pooling_head(experiment: Path, name: str):
    message = config_error(experiment, [f"model.name={name}", "data.batch_size=1"])
    assert "data.batch_size" in message and "BatchNorm" in message and "data.batch_size >= 2" in message
    # SyncBN across two workers sees two images per BatchNorm: fine
    cfg = load_config(experiment, [f"model.name={name}", "data.batch_size=1", "trainer.num_workers=2"])
    assert cfg.data.batch_size == 1
    assert "BatchNorm" in config_error(experiment, [f"model.name={name}", "data.batch_size=1",
                                                    "trainer.num_workers=2", "model.sync_bn=false"])
    # heads without pyramid pooling train with one image per worker
    assert load_config(experiment, ["model.name=tiny", "data.batch_size=1"]).data.batch_size == 1


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["eval.mode=sliding"], "eval.mode", "must be one of whole, slide, got 'sliding'"),
        (["trainer.eval_interval=0"], "trainer.eval_interval", "must be > 0"),
        (["trainer.checkpoint_interval=-5"], "trainer.checkpoint_interval", "must be > 0"),
        (["trainer.log_interval=0"], "trainer.log_interval", "must be > 0"),
        (["trainer.max_iters=60"], "schedule.milestones", "go beyond trainer.max_iters=60"),
        (["schedule.milestones=[80,50]"], "schedule.milestones", "strictly increasing"),
        (["optim.lr=0"], "optim.lr", "must be > 0"),
        (["optim.betas=[0.9,1.5]"], "optim.betas", "[0, 1)"),
        (["model.num_classes=300"], "model.num_classes", "between 1 and 255"),
        (["model.drop_path_rate=1.5"], "model.drop_path_rate", "[0, 1)"),
        (["data.ratio_range=[2.0,0.5]"], "data.ratio_range", "low <= high"),
        (["data.cat_max_ratio=0"], "data.cat_max_ratio", "(0, 1]"),
        (["data.synthesize=true", "data.root=s3://bucket/ade"], "data.synthesize", "local dataset"),
        (["eval.mode=slide", "eval.stride=[600,600]"], "eval.stride", "larger than eval.crop"),
        (["eval.ms_ratios=[]"], "eval.ms_ratios", "non-empty"),
        (["eval.test_scale=[64,16]"], "eval.test_scale", "below the 32 pixels"),
        (["eval.test_scale=[128,48]", "eval.ms_ratios=[0.5,1.0]"], "eval.ms_ratios", "below the 32 pixels"),
        (["storage.num_to_keep=0"], "storage.num_to_keep", ">= 1"),
        (["tracking.delivery_timeout_s=-1"], "tracking.delivery_timeout_s", "must be >= 0 seconds, got -1"),
        (["trainer.num_workers=0"], "trainer.num_workers", "must be > 0"),
    ],
)
def test_values_that_cannot_work(experiment: Path, overrides: list[str], key: str, expected: str):
    message = config_error(experiment, overrides)
    assert f"{key}: " in message and expected in message


def test_placement_strategy_is_one_of_rays(experiment: Path):
    assert load_config(experiment).trainer.placement_strategy == "PACK"
    for strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        cfg = load_config(experiment, [f"trainer.placement_strategy={strategy}"])
        assert cfg.trainer.placement_strategy == strategy
    message = config_error(experiment, ["trainer.placement_strategy=spread_out"])
    assert "trainer.placement_strategy: " in message and "'spread_out'" in message
    assert "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD" in message


def test_gpu_fast_path_switches_and_their_defaults(experiment: Path):
    trainer, data = load_config(experiment).trainer, load_config(experiment).data
    assert (trainer.tf32, trainer.cudnn_benchmark, trainer.channels_last, trainer.compile) == (True, True, False, False)
    assert data.pin_memory is True
    cfg = load_config(experiment, ["trainer.tf32=false", "trainer.channels_last=true", "trainer.compile=true",
                                   "trainer.cudnn_benchmark=false", "data.pin_memory=false"])
    assert (cfg.trainer.tf32, cfg.trainer.channels_last, cfg.trainer.compile, cfg.trainer.cudnn_benchmark,
            cfg.data.pin_memory) == (False, True, True, False, False)
    assert "trainer.channels_last must be true or false" in config_error(experiment, ["trainer.channels_last=maybe"])


def test_validation_error_names_the_file_that_set_the_value(tmp_path: Path):
    path = write(tmp_path / "exp.yaml", "eval:\n  mode: fast\n")
    message = config_error(path, [])
    assert message.startswith(f"{path}: eval.mode: must be one of whole, slide")


def test_interpolation(experiment: Path):
    cfg = load_config(experiment, ['eval.crop=["${data.crop_size}","${data.crop_size}"]'])
    assert list(cfg.eval.crop) == [64, 64]
    assert "cannot resolve interpolation" in config_error(experiment, ["data.crop_size=${data.nothing}"])


def test_resolved_config_round_trip(experiment: Path, tmp_path: Path):
    cfg = load_config(experiment, ["optim.lr=2e-4", "tracking.tags.row=x", "optim.no_decay_keys=[norm,bias]",
                                   "data.val_max_images=3"])
    saved = tmp_path / "run" / "config.yaml"  # as a checkpoint keeps it
    saved.parent.mkdir()
    saved.write_text(config_to_yaml(cfg))
    again = load_config(saved)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert config_to_yaml(again) == config_to_yaml(cfg) == saved.read_text()
    from_dict = config_from_container(OmegaConf.to_container(cfg))
    assert OmegaConf.to_container(from_dict) == OmegaConf.to_container(cfg)
    with pytest.raises(ConfigError, match=r"checkpoint: unknown key optim\.learning_rate"):
        config_from_container({"optim": {"learning_rate": 1}}, source="checkpoint")


def test_secrets_are_redacted(experiment: Path):
    cfg = load_config(experiment, ["tracking.uri=https://alice:hunter2@mlflow.example.com:5000",
                                   "model.pretrained=s3://bucket/w.pth?X-Amz-Signature=abcd&part=1"])
    text = config_to_yaml(cfg)
    assert "hunter2" not in text and "abcd" not in text and "alice" not in text
    assert "https://***@mlflow.example.com:5000" in text
    flat = flatten_config(cfg)
    assert flat["tracking.uri"] == "https://***@mlflow.example.com:5000"
    assert flat["model.pretrained"] == "s3://bucket/w.pth?X-Amz-Signature=***&part=1"
    assert flat["optim.lr"] == 1e-4 and flat["data.scale"] == "[2048, 512]"
    assert redact("s3://bucket/prefix") == "s3://bucket/prefix"
    # the AWS key ids the storage rules always caught are caught in configs too (tags are free text)
    tagged = load_config(experiment, ["tracking.tags.note=key AKIAIOSFODNN7EXAMPLE"])
    assert "AKIAIOSFODNN7EXAMPLE" not in config_to_yaml(tagged)


@pytest.mark.parametrize("key", ["storage.uri", "data.root", "model.pretrained", "model.init_checkpoint"])
def test_credentials_in_uris_are_refused_without_repeating_them(experiment: Path, tmp_path: Path, key: str):
    uri = "s3://AKIAIOSFODNN7EXAMPLE:S3cr3tPass@bucket/x"
    with pytest.raises(ConfigError) as error:
        load_config(experiment, [f"{key}={uri}"])
    message = str(error.value)
    assert "\n" not in message and "S3cr3tPass" not in message and "AKIAIOSFODNN7EXAMPLE" not in message
    assert f"{key}: credentials in the URI are refused (s3://***@bucket/x)" in message, message
    assert "environment" in message and "profile" in message and "IAM role" in message
    # set in a YAML file: the file is named, the secret is not repeated
    section, name = key.split(".")
    (tmp_path / "creds.yaml").write_text(f"base: {experiment}\n{section}:\n  {name}: {uri}\n")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "creds.yaml")
    assert str(error.value).startswith(f"{tmp_path / 'creds.yaml'}: {key}: credentials"), error.value
    assert "S3cr3tPass" not in str(error.value)


def test_merge_overrides_returns_a_new_validated_config(experiment: Path):
    cfg = load_config(experiment)
    tuned = merge_overrides(cfg, {"optim.lr": 5e-4, "data.crop_size": 32})
    assert tuned.optim.lr == pytest.approx(5e-4) and tuned.data.crop_size == 32 and cfg.optim.lr == 1e-4
    assert merge_overrides(cfg, ["trainer.seed=3"]).trainer.seed == 3
    # layers apply in order, the seed offset counts from the seed they leave (a sweep's repeats)
    layered = merge_overrides(cfg, {"trainer.seed": 5, "optim.lr": 1e-3}, ["trainer.seed=7"], seed_offset=2)
    assert layered.trainer.seed == 9 and layered.optim.lr == pytest.approx(1e-3)
    # validated once, as a whole: milestones beyond max_iters in one layer are fine when a later one raises it
    assert merge_overrides(cfg, {"schedule.milestones": [150]}, ["trainer.max_iters=200"]).trainer.max_iters == 200
    with pytest.raises(ConfigError, match=r"^override 'trainer.seed=x': trainer.seed must be an integer"):
        merge_overrides(cfg, {"optim.lr": 1e-3}, ["trainer.seed=x"])
    with pytest.raises(ConfigError, match=r"sweep optim\.lr='x': optim\.lr must be a number"):
        merge_overrides(cfg, {"optim.lr": "x"}, source="sweep")
    with pytest.raises(ConfigError, match=r"eval\.mode"):
        merge_overrides(cfg, {"eval.mode": "best"})


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_experiment_file_loads(path: Path):
    cfg = load_config(path)
    assert cfg.model.name in list_models()
    # and stays valid with the small overrides the tests and the CPU demo use
    small = load_config(path, [*SMALL, "trainer.num_workers=1", "trainer.use_gpu=false"])
    assert small.data.crop_size == 64


def test_experiment_rows_follow_the_reference_recipe():
    rows = sorted((REPO_ROOT / "experiments" / "ade20k").glob("knet*.yaml"))
    assert len(rows) == 7, [p.name for p in rows]
    for path in rows:
        cfg = load_config(path)
        swin = "swin" in path.name
        assert cfg.model.name in path.name, (path.name, cfg.model.name)
        assert cfg.optim.lr == pytest.approx(6e-5 if swin else 1e-4), path.name
        assert cfg.optim.weight_decay == pytest.approx(5e-4) and cfg.optim.clip_grad_norm == 1.0
        expected_no_decay = ["absolute_pos_embed", "relative_position_bias_table", "norm"] if swin else []
        assert list(cfg.optim.no_decay_keys) == expected_no_decay, path.name
        assert (cfg.schedule.warmup_iters, cfg.schedule.warmup_ratio) == (1000, 0.001)
        assert list(cfg.schedule.milestones) == [60000, 72000] and cfg.schedule.gamma == pytest.approx(0.1)
        assert (cfg.trainer.max_iters, cfg.trainer.eval_interval, cfg.trainer.checkpoint_interval) == (80000, 8000,
                                                                                                        8000)
        assert (cfg.trainer.num_workers, cfg.trainer.use_gpu, cfg.data.batch_size) == (8, True, 2)
        assert cfg.trainer.amp is False and cfg.model.num_classes == 150 and cfg.data.root == "data/ade20k"
        # all 8 workers on one 8-GPU node or none: never DDP + SyncBN across nodes over TCP
        assert cfg.trainer.placement_strategy == "STRICT_PACK", path.name
        crop = 640 if "640x640" in path.name else 512
        assert cfg.data.crop_size == crop and list(cfg.data.scale) == [2048, crop], path.name
        assert list(cfg.eval.test_scale) == [2048, crop] and cfg.eval.mode == "whole"
        # the ImageNet weights of the row's reference config, by default (model.pretrained=none: from scratch)
        reference = REFERENCE_WEIGHTS[MODELS[cfg.model.name].reference_pretrained]
        assert (cfg.model.pretrained, cfg.model.pretrained_sha256) == (reference.url, reference.sha256), path.name
        expected_weights = ("swin_large_patch4_window7_224_22k_20220308-d5bdebaf.pth" if "swin-l" in path.name else
                            "swin_tiny_patch4_window7_224_20220308-f41b89d3.pth" if "swin-t" in path.name else
                            "resnet50_v1c-2cccc1ad.pth")
        assert reference.url.endswith("/" + expected_weights) and reference.sha256 == expected_weights[-12:-4]
        if "swin-l" in path.name:
            assert cfg.model.drop_path_rate == pytest.approx(0.4 if crop == 640 else 0.3)
        elif "swin-t" in path.name:
            assert cfg.model.drop_path_rate == pytest.approx(0.3)


def test_pretrained_settings_are_checked(experiment: Path):
    cfg = load_config(experiment, ["model.pretrained=none", "model.pretrained_sha256=2CCCC1AD"])
    assert cfg.model.pretrained == "none" and cfg.model.cache_dir == "~/.cache/knetlab/weights"
    message = config_error(experiment, ["model.pretrained_sha256=2ccc"])
    assert "model.pretrained_sha256: must be null (not known) or the file's sha256 in hex" in message
    assert "model.pretrained: ftp://h/w.pth: unknown scheme" in config_error(experiment, ["model.pretrained=ftp://h/w.pth"])
    assert "model.pretrained: must be null" in config_error(experiment, ["model.pretrained=' '"])
    assert "optim.lr_mult_keys.backbone" in config_error(experiment, ["optim.lr_mult_keys.backbone=-1"])


def test_model_overrides_are_zoo_options(experiment: Path):
    cfg = load_config(experiment, ["model.overrides.dropout_ratio=0.0", "model.overrides.channels=32",
                                   "model.norm_eval=true"])
    assert dict(cfg.model.overrides) == {"dropout_ratio": 0.0, "channels": 32} and cfg.model.norm_eval is True
    message = config_error(experiment, ["model.overrides.dropout=0.0"])
    assert "model.overrides.dropout: not a model option; did you mean model.overrides.dropout_ratio?" in message
    assert "set model.num_classes instead" in config_error(experiment, ["model.overrides.num_classes=3"])
    message = config_error(experiment, ["model.overrides.head=segformer"])  # the zoo's own check
    assert "model.overrides" in message and "segformer" in message and "upernet" in message
    # an override that changes the head changes what is checked: UperNet needs two images per BatchNorm
    assert "BatchNorm" in config_error(experiment, ["model.overrides.head=upernet", "data.batch_size=1"])
