"""`knetlab data`: dataset tools. `data synth` writes a synthetic dataset (ADE20K's layout, COCO's, or one with
classes of its own and a classes.txt); `data check ROOT` reports a semantic dataset (class histogram, image sizes,
every problem: missing pairs, size mismatches, labels out of range, unreadable files) without training, and exits 0
when it found no problem, 2 (bad input, the code `knetlab train` would exit with on it) when it found some."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from knetlab.redact import redact

EXIT_PROBLEMS = 2  # cli.EXIT_USAGE: a dataset with problems is bad input


def add_parser(commands: Any) -> None:
    """The `data` command and its subcommands, on the `knetlab` parser's subcommands."""
    data = commands.add_parser("data", help="dataset tools: synthesize, check", description="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", parser_class=type(data))
    data_commands.required = True

    synth = data_commands.add_parser(
        "synth", help="write a synthetic dataset in ADE20K's or COCO's layout, or with classes of its own",
        description="write a synthetic dataset in ADEChallengeData2016's layout, in COCO 2017's (panoptic PNG+JSON or "
                    "instances JSON), or with classes of its own (--format custom: ADE20K's folders with labels "
                    "0..N-1, 255 ignored, a classes.txt with names and colours, and train.txt/val.txt list files)")
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory (custom: the dataset root)")
    synth.add_argument("--format", choices=["ade20k", "coco-panoptic", "coco-instance", "custom"], default="ade20k",
                       help="dataset layout (default: ade20k)")
    synth.add_argument("--train", type=positive_int, default=None, metavar="N", help="training images")
    synth.add_argument("--val", type=positive_int, default=None, metavar="N", help="validation images")
    synth.add_argument("--classes", type=positive_int, default=None, metavar="K",
                       help="classes in use (ade20k: <= 150 of ADE20K's; custom: the dataset's count, default 5)")
    synth.add_argument("--names", default=None, metavar="A,B,...",
                       help="custom: the class names, comma-separated (default: sky, meadow, pond, kite, ...)")
    synth.add_argument("--seed", type=int, default=None, metavar="S", help="random seed")
    synth.add_argument("--image-size", type=positive_int, nargs=2, default=None, metavar=("H", "W"),
                       help="one size for every image (default: random sides in [--min-side, --max-side])")
    synth.add_argument("--min-side", type=positive_int, default=None, help="smallest random image side")
    synth.add_argument("--max-side", type=positive_int, default=None, help="largest random image side")
    synth.set_defaults(handler=cmd_data_synth, parser=synth)

    check = data_commands.add_parser(
        "check", help="report a semantic dataset's classes, image sizes and every problem, without training",
        description="report a semantic dataset (ADE20K's folders or list files): the classes and where they come "
                    "from, each split's image sizes, the class histogram and every problem (missing pairs, size "
                    "mismatches, labels out of range, unreadable files). Exit code 0: no problem; 2: problems found "
                    "(listed) or no dataset at ROOT.")
    check.add_argument("root", metavar="ROOT", help="the dataset: a local folder or s3:// URI (data.root)")
    check.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="data keys as in an experiment, e.g. data.reduce_zero_label=true "
                            "data.train_list=train.txt data.val_list=val.txt data.classes_file=classes.yaml")
    check.add_argument("--experiment", default=None, metavar="EXP.yaml",
                       help="take the data section (classes, encoding, list files) from this experiment")
    check.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="threads decoding files (default: CPUs + 2, at most 8)")
    check.set_defaults(handler=cmd_data_check)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_data_synth(args: argparse.Namespace) -> int:
    options = {key: value for key, value in (
        ("num_train", args.train), ("num_val", args.val), ("num_classes", args.classes), ("seed", args.seed),
        ("image_size", tuple(args.image_size) if args.image_size else None), ("min_side", args.min_side),
        ("max_side", args.max_side),
    ) if value is not None}
    if args.names is not None and args.format != "custom":
        args.parser.error("--names applies to --format custom only")
    if args.format == "custom":
        from knetlab.data.synthetic_custom import generate_synthetic_custom

        names = [name.strip() for name in args.names.split(",")] if args.names is not None else None
        root = generate_synthetic_custom(args.out, class_names=names, **options)
        print(f"synthetic dataset with its own classes written to {root} (classes.txt, reduce_zero_label false); "
              f"check it with: knetlab data check {root}")
        return 0
    if args.format != "ade20k":
        if "num_classes" in options:
            args.parser.error("--classes applies to --format ade20k or custom only")
        from knetlab.data.synthetic_coco import generate_synthetic_coco

        task = args.format.removeprefix("coco-")
        root = generate_synthetic_coco(args.out, task=task, **options)
        print(f"synthetic COCO {task} dataset written to {root}")
        return 0
    from knetlab.data.synthetic import generate_synthetic_ade20k

    root = generate_synthetic_ade20k(args.out, **options)
    print(f"synthetic ADE20K-format dataset written to {root}")
    return 0


def check_config(args: argparse.Namespace) -> Any:
    """The config whose data section describes ROOT: the experiment's (--experiment) or the defaults, with
    data.root=ROOT and the overrides; its classes are settled as for training."""
    from knetlab.platform.config import config_from_container, load_config
    from knetlab.platform.structured_config import nest, parse_override

    overrides = [f"data.root={args.root}", *args.overrides]
    if args.experiment:
        return load_config(args.experiment, overrides)
    data: dict[str, Any] = {}
    for item in overrides:
        merge_into(data, nest(*parse_override(item)))
    return config_from_container(data, source="knetlab data check")


def merge_into(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value


def cmd_data_check(args: argparse.Namespace) -> int:
    from knetlab.data import DatasetError
    from knetlab.data.check import check_dataset, format_report
    from knetlab.data.classes import dataset_classes
    from knetlab.platform.config import ConfigError
    from knetlab.platform.tasks import task_of

    cfg = check_config(args)
    if task_of(cfg) != "semantic":
        raise ConfigError(f"knetlab data check reports semantic datasets; model {cfg.model.name} is a "
                         f"{task_of(cfg)} model (its dataset is checked by `knetlab train` before it starts)")
    report = check_dataset(cfg.data.root, dataset_classes(cfg.data, cfg.model.num_classes, look_beside_data=False),
                           reduce_zero_label=cfg.data.reduce_zero_label,
                           list_files={"training": cfg.data.train_list, "validation": cfg.data.val_list},
                           cache_dir=cfg.data.cache_dir, max_workers=args.workers)
    try:  # what training would refuse too: a classes file beside the data that the config did not read
        from knetlab.platform.semantic_task import check_classes_beside_data

        check_classes_beside_data(cfg)
    except DatasetError as error:
        report.dataset_problems.append(str(error))
    print(redact(format_report(report)), flush=True)
    if report.problems:
        sys.stderr.write(f"knetlab: error: {len(report.problems)} problem(s) in the dataset at "
                         f"{redact(cfg.data.root)} (listed above)\n")
        return EXIT_PROBLEMS
    return 0
