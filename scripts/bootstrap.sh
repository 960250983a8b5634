#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv with everything knetlab and its tests need.
# The matched torch/torchvision pair goes in first and is written to a constraints file, so nothing installed later
# can pull another torch (timm fails to import with a torchvision built for a different torch).
# GPU users override the pair, e.g.:
#   KNETLAB_TORCH="torch==2.14.1 torchvision==0.29.1" KNETLAB_TORCH_INDEX=https://download.pytorch.org/whl/cu128 make demo
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KNETLAB_VENV:-.venv}
TORCH_SPEC=${KNETLAB_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.knetlab-bootstrap"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/knetlab" ]; then
    exit 0
fi
echo "[bootstrap] creating $VENV (torch: $TORCH_SPEC); first run takes a few minutes" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip>=24" setuptools wheel
# pip byte-compiles what it installs on one core (70 of the 130 s of a bootstrap here); compileall below does it on
# every core. The .pyc files matter: where PYTHONDONTWRITEBYTECODE is set, nothing writes them at import.
INSTALL=(install --no-compile)
index_args=()
[ -n "${KNETLAB_TORCH_INDEX:-}" ] && index_args=(--index-url "$KNETLAB_TORCH_INDEX")
# shellcheck disable=SC2086
"${PIP[@]}" "${INSTALL[@]}" ${index_args[@]+"${index_args[@]}"} $TORCH_SPEC
"$VENV/bin/python" - "$VENV/constraints.txt" <<'PY'
import sys
from importlib.metadata import version
with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision"):
        f.write(f"{name}=={version(name)}\n")
PY
"${PIP[@]}" "${INSTALL[@]}" -c "$VENV/constraints.txt" -e ".[dev]"
# Exit status ignored: a few files are not Python 3.11 on purpose (torch's py312_intrinsics.py), as pip ignores them.
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, torchvision, timm, ray, mlflow; print('[bootstrap] torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)" >&2
echo "$want" > "$stamp"
