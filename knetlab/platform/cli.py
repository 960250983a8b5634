"""The `knetlab` command line (also `python -m knetlab`): one subcommand per job, each taking `key=value` config
overrides. Heavy modules (torch, Ray, MLflow) are imported only by the subcommand that needs them; an expected
error (bad config, missing dataset, unreachable storage, ...) is one `knetlab: error: ...` line, not a traceback,
with credentials redacted.

Exit codes (a contract: scripts and schedulers may rely on them; tests/test_exit_codes.py pins each one):
    0    success
    1    runtime failure: storage (checkpoint storage unreachable, access denied, missing bucket), tracking (MLflow
         server, unknown run), training (a run that failed or cannot be placed on the cluster), comparison
    2    bad input: config file, override or value, dataset, model or weights file, checkpoint, command-line arguments
    130  interrupted (Ctrl-C / SIGINT); a stopped run continues with `knetlab train EXPERIMENT.yaml --resume RUN`
An unexpected error (a bug) prints its traceback and exits 1, as Python does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from knetlab import __version__
from knetlab.platform import cli_compare, cli_data
from knetlab.platform.config import config_to_yaml, load_config
from knetlab.redact import redact

EXIT_ERROR = 1  # a runtime failure: storage, tracking, training
EXIT_USAGE = 2  # bad input: config, data, model/weights, checkpoint, arguments
EXIT_INTERRUPTED = 130

# Expected error types by (module, name) with their exit code: looked up in sys.modules only, since an error can only
# come from a module that was imported, and looking them up must not import torch or Ray. The first match wins.
EXPECTED_ERRORS = (
    ("knetlab.platform.config", "ConfigError", EXIT_USAGE),
    ("knetlab.platform.cli", "UsageError", EXIT_USAGE),
    ("knetlab.data.errors", "DatasetError", EXIT_USAGE),
    ("knetlab.models.errors", "ModelError", EXIT_USAGE),  # also ConversionError, PretrainedError
    ("knetlab.platform.checkpoint", "CheckpointError", EXIT_USAGE),
    ("knetlab.platform.storage", "StorageError", EXIT_ERROR),
    ("knetlab.platform.trainer", "TrainingError", EXIT_ERROR),
    ("knetlab.platform.compare", "CompareError", EXIT_ERROR),
    ("knetlab.platform.sweep", "SweepError", EXIT_ERROR),
    ("knetlab.platform.tracking", "TrackingError", EXIT_ERROR),
    ("mlflow.exceptions", "MlflowException", EXIT_ERROR),  # e.g. an unknown run id or an unreachable tracking server
)


class UsageError(Exception):
    """A command line that cannot run (exit code 2)."""


class KnetlabArgumentParser(argparse.ArgumentParser):
    """argparse with one-line `knetlab: error: ...` messages (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"knetlab: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


# ---------------------------------------------------------------------------------------------------------------
# Subcommands


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.experiment, args.overrides)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.experiment, args.overrides)
    from knetlab.platform.trainer import run_training

    run_training(cfg, resume=args.resume)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if not Path(args.sweep).is_file():
        raise UsageError(f"{args.sweep}: sweep file does not exist")
    from knetlab.platform.sweep import run_sweep

    overrides, resume = list(args.overrides), args.resume
    if isinstance(resume, str) and "=" in resume:  # `--resume key=value`: no sweep id, the newest of this name
        overrides, resume = [resume, *overrides], True
    run_sweep(args.sweep, overrides, resume=resume)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from knetlab.models import models_table

    rows = [("name", "backbone", "head", "crop", "parameters")]
    rows += [(row["name"], row["backbone"], row["head"], row["crop"], f"{row['params'] / 1e6:.2f} M")
             for row in models_table()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from knetlab.models import convert_checkpoint_file, convert_mmdet_checkpoint_file

    convert = convert_mmdet_checkpoint_file if args.source == "mmdet" else convert_checkpoint_file
    out = convert(args.input, args.output, args.model)
    print(f"converted {args.input} ({args.source} layout) to {out} for model {args.model}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = load_config(args.experiment, args.overrides)
    target = None
    if args.log or args.mlflow_run:
        if not (args.checkpoint or args.mlflow_run or os.environ.get("MLFLOW_RUN_ID")):
            raise UsageError("--log needs the run to log to: --checkpoint URI (the run that trained it) or "
                             "--mlflow-run RUN_ID")
        from knetlab.platform.eval_checkpoint import mlflow_target

        target = mlflow_target(cfg, args.checkpoint, args.mlflow_run)
    options = {
        "warmup": args.warmup, "timed": args.images, "train_steps": args.train_steps, "device": args.device,
        "image_size": tuple(args.image_size) if args.image_size else None,
    }
    from knetlab.platform.bench_experiment import benchmark_experiment as measure
    from knetlab.platform.bench_experiment import run_on_ray

    if args.data:
        from knetlab.platform.data_bench import benchmark_data_experiment as measure
    if args.ray:
        # One Ray task with a GPU of its own when the experiment trains on GPUs (or --device cuda): the GPU's figures.
        result = run_on_ray(measure, cfg, options)
        if args.data:
            from knetlab.platform.data_bench import format_data_benchmark as format_benchmark
        else:
            from knetlab.evaluation import format_benchmark
        print(format_benchmark(result), flush=True)
    else:
        result = measure(cfg, options)
    if target is not None:
        from knetlab.platform.eval_checkpoint import log_benchmark

        log_benchmark(*target, result, artifact_file="bench/data_bench.json" if args.data else "bench/bench.json")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.experiment, args.overrides)
    from knetlab.platform.eval_checkpoint import evaluate_checkpoint, log_evaluation, mlflow_target
    from knetlab.platform.trainer import absolute_paths

    # The MLflow run is found before the (long) evaluation, so a wrong run id fails at once.
    target = mlflow_target(cfg, args.checkpoint, args.mlflow_run) if args.log or args.mlflow_run else None
    outcome = evaluate_checkpoint(absolute_paths(cfg), args.checkpoint, ms_flip=args.ms_flip)
    if target is not None:
        log_evaluation(*target, outcome)
    if outcome.get("artifacts"):
        shutil.rmtree(outcome["artifacts"], ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    parser = KnetlabArgumentParser(
        prog="knetlab",
        description="Train, sweep, evaluate and compare K-Net segmentation models on Ray, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"knetlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=KnetlabArgumentParser)
    commands.required = True
    overrides_help = "config overrides, e.g. trainer.max_iters=1000 optim.lr=2e-4"

    def experiment_command(name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("experiment", metavar="EXPERIMENT.yaml", help="experiment config file")
        sub.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=overrides_help)
        sub.set_defaults(handler=handler)
        return sub

    train = experiment_command("train", "train a model on Ray (a local Ray if no cluster is running)", cmd_train)
    train.add_argument("--resume", metavar="RUN", default=None,
                       help="continue the run RUN (its name or MLflow run id) from its newest checkpoint")

    sweep = commands.add_parser("sweep", help="run a Ray Tune sweep of experiments",
                                description="run a Ray Tune sweep of experiments")
    sweep.add_argument("sweep", metavar="SWEEP.yaml", help="sweep definition file")
    sweep.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="sweep keys (repeats=3, scheduler.type=fifo, limits.max_concurrent_trials=4) or, for any "
                            "other key, every trial's experiment config (trainer.max_iters=1000)")
    sweep.add_argument("--resume", metavar="SWEEP_ID", nargs="?", const=True, default=None,
                       help="continue an interrupted sweep: the one named (its id, printed at start), else the newest "
                            "sweep of this file's name; finished trials are not run again")
    sweep.set_defaults(handler=cmd_sweep)

    evaluate = experiment_command("eval", "evaluate a checkpoint on the validation split", cmd_eval)
    evaluate.add_argument("--checkpoint", required=True, metavar="URI",
                          help="checkpoint directory: local path or s3://bucket/prefix/checkpoint_...")
    evaluate.add_argument("--ms-flip", action="store_true",
                          help="multi-scale + flip testing (eval.ms_ratios, eval.flip) besides single scale")
    evaluate.add_argument("--log", action="store_true",
                          help="log the metrics to the checkpoint's MLflow run (tracking.uri), at its iteration")
    evaluate.add_argument("--mlflow-run", default=None, metavar="RUN_ID",
                          help="log to this MLflow run instead (implies --log; default $MLFLOW_RUN_ID, then the "
                               "checkpoint's run)")

    bench = experiment_command("bench", "measure inference fps, training step time and peak memory", cmd_bench)
    bench.add_argument("--warmup", type=_non_negative_int, default=5, help="untimed inference images (default 5)")
    bench.add_argument("--images", type=_positive_int, default=200,
                       help="timed inference images (default 200, as mmsegmentation's benchmark)")
    bench.add_argument("--train-steps", type=_non_negative_int, default=5,
                       help="timed training steps, 0 to skip training (default 5)")
    bench.add_argument("--image-size", type=_positive_int, nargs=2, metavar=("H", "W"), default=None,
                       help="inference image size (default: a 512x683 image resized to eval.test_scale)")
    bench.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if trainer.use_gpu and "
                                                       "a GPU is present, else cpu)")
    bench.add_argument("--data", action="store_true",
                       help="the data pipeline instead: samples/s in one loader process and with data.num_workers, "
                            "beside the training step's, and whether training is loader-bound (--images items)")
    bench.add_argument("--ray", action="store_true",
                       help="run on a Ray worker (with a GPU when trainer.use_gpu) instead of this process")
    bench.add_argument("--log", action="store_true",
                       help="log bench/fps, bench/mem_gb, bench/step_s to an MLflow run (--checkpoint or --mlflow-run)")
    bench.add_argument("--checkpoint", default=None, metavar="URI",
                       help="with --log: log to the MLflow run that trained this checkpoint")
    bench.add_argument("--mlflow-run", default=None, metavar="RUN_ID", help="log to this MLflow run (implies --log)")

    cli_compare.add_parser(commands)

    config = experiment_command("config", "print the resolved config", cmd_config)
    config.description = "print the resolved config (YAML, loadable again with any command)"

    cli_data.add_parser(commands)  # knetlab data synth | check

    convert = commands.add_parser("convert", help="convert released weights to knetlab's format",
                                  description="convert released weights to knetlab's format")
    convert.add_argument("source", choices=["mmseg", "mmdet"],
                         help="where the weights come from: mmsegmentation (ADE20K) or the K-Net repo's mmdet (COCO)")
    convert.add_argument("input", metavar="IN.pth", help="released checkpoint")
    convert.add_argument("output", metavar="OUT.pt", help="knetlab state dict to write")
    convert.add_argument("--model", required=True, metavar="NAME", help="model zoo name (see `knetlab models`)")
    convert.set_defaults(handler=cmd_convert)

    models = commands.add_parser("models", help="list the model zoo", description="list the model zoo")
    models.set_defaults(handler=cmd_models)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def exit_code(error: BaseException) -> int | None:
    """The exit code of an expected error (see EXPECTED_ERRORS), None for an unexpected one."""
    for module_name, name, code in EXPECTED_ERRORS:
        error_type = getattr(sys.modules.get(module_name), name, None)
        if isinstance(error_type, type) and isinstance(error, error_type):
            return code
    return None


def main(argv: Sequence[str] | None = None) -> int:
    # MLflow prints run links with the tracking URI as given, a password in it included (knetlab prints its own,
    # redacted); Ray's workers inherit this from the driver.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also come after options (`train exp.yaml --resume RUN a=1`); argparse stops its
    # positional list at the first option, so those arrive here.
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        sys.stderr.write("knetlab: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as error:
        code = exit_code(error)
        if code is None or os.environ.get("KNETLAB_DEBUG"):
            raise
        message = redact(" ".join(str(error).split()) or type(error).__name__)
        sys.stderr.write(f"knetlab: error: {message}\n")
        return code
