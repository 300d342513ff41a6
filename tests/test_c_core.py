"""Builds and runs the C core's own test program (tests/c/) with the system compiler."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_c_core_checks_pass(tmp_path):
    run = subprocess.run(
        ["bash", str(HERE / "c" / "run.sh")],
        env={**os.environ, "OUT_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
