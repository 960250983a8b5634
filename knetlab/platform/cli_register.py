"""`knetlab register RUN --name NAME [--alias ALIAS]`: a run's MLflow model (its best checkpoint; logged first when
the run has none) registered as a new version of NAME, with the alias pointing at it; `knetlab predict
models:/NAME@ALIAS ...` and `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` then use it. Also adds
`--register-best NAME` to `knetlab compare`: the best run of the table's top row, registered the same way."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    sub = commands.add_parser("register", help="register a run's model in the MLflow model registry",
                              description="register a run's best checkpoint as a version of an MLflow registered "
                                          "model (logging it as the run's MLflow model first if needed)")
    sub.add_argument("run", metavar="RUN", help="MLflow run id, or the run's name (knetlab run name or MLflow's)")
    sub.add_argument("--name", required=True, help="registered model name")
    sub.add_argument("--alias", default=None, help="alias to point at the new version, e.g. champion")
    sub.add_argument("--tracking-uri", default=None, metavar="URI",
                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    sub.set_defaults(handler=cmd_register)
    compare = commands.choices.get("compare")
    if compare is not None:
        compare.add_argument("--register-best", default=None, metavar="NAME",
                             help="register the best run of the top row (rows sorted by mIoU unless --sort) as a "
                                  "version of NAME with the alias --alias (default champion)")
        compare.add_argument("--alias", default="champion", help="with --register-best: the alias to set")
    return sub


def cmd_register(args: argparse.Namespace) -> int:
    from knetlab.platform.mlflow_model import register

    register(args.run, args.name, args.alias, tracking_uri=args.tracking_uri)
    return 0
