"""scripts/gpu_check.sh in its CPU mode, so that the GPU check cannot rot between GPU runs. On CPU it runs the same
steps with the tiny models: the benchmark of each row in fp32 and bf16, then a short Ray Train run with checkpoints in
a moto S3 server and metrics in an `mlflow server` (both started by the script). It checks the loss fell and no
logged value is NaN, then writes the table section into a Markdown file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_passes_in_its_cpu_mode(tmp_path: Path):
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nOther sections stay.\n")
    env = {**os.environ, "KNETLAB_PYTHON": sys.executable, "RAY_ADDRESS": ""}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"\[gpu_check +\d+s\] passed", done.stdout), output[-6000:]
    text = out.read_text()
    assert text.startswith("# Performance\n\nOther sections stay.\n\n## GPU check\n\n<!-- gpu_check:begin -->")
    assert text.rstrip().endswith("<!-- gpu_check:end -->")
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[1].strip() for row in rows] == ["tiny", "tiny-panoptic"], rows
    for row in rows:  # the figures of both precisions are there
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert all(float(cells[i]) > 0 for i in (3, 4, 6, 7, 8, 9)), cells
    assert "Training run (gpu-check-" in text and "non-finite values: 0." in text
