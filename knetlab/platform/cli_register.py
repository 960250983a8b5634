"""`knetlab register RUN --name NAME [--alias ALIAS]`: a run's MLflow model (its best checkpoint; logged first when
the run has none) registered as a new version of NAME, with the alias pointing at it; `knetlab predict
models:/NAME@ALIAS ...` and `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` then use it. (`knetlab compare
--register-best NAME` registers the best run of the table's top row the same way.)"""

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
    return sub


def cmd_register(args: argparse.Namespace) -> int:
    from knetlab.platform.mlflow_model import register

    register(args.run, args.name, args.alias, tracking_uri=args.tracking_uri)
    return 0
