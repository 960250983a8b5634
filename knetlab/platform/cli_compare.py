"""`knetlab compare`: its arguments and handler (the tables themselves are compare.py's)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_compare(args: argparse.Namespace) -> int:
    from knetlab.platform.compare import run_compare

    run_compare(experiment=args.experiment, parent_run_id=args.parent, out_dir=args.out, log=args.log,
                filter_string=args.filter, sort=args.sort, tracking_uri=args.tracking_uri)
    return 0


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The `compare` subcommand on the command line's subparsers."""
    description = ("print the results tables of an experiment from MLflow (one per task: the K-Net ADE20K table, "
                   "the COCO panoptic and instance tables), mean ± std over seeds")
    compare = commands.add_parser("compare", help="print the results table of an experiment from MLflow",
                                  description=description)
    compare.add_argument("--experiment", default=None, help="MLflow experiment name (default: knetlab)")
    compare.add_argument("--parent", default=None, metavar="RUN_ID",
                         help="only the trials of this sweep: its parent run id or its sweep id (printed at start)")
    compare.add_argument("--filter", default=None, metavar="STR", help="MLflow search filter, e.g. tags.head = 'fcn'")
    compare.add_argument("--sort", default=None, metavar="COL", help="sort by this table column, e.g. mIoU or PQ")
    compare.add_argument("--out", default=None, metavar="DIR", help="write the tables and plots to DIR")
    compare.add_argument("--log", action="store_true", help="log the tables and plots to the sweep's parent run")
    compare.add_argument("--tracking-uri", default=None, metavar="URI",
                         help="MLflow tracking server or store, e.g. http://127.0.0.1:5000 (default: "
                              "$MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db); never printed with credentials")
    compare.set_defaults(handler=cmd_compare)
    return compare
