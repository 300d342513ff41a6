"""The user's CFLAGS come after the project's in every compile command, so they win
(issue 27): CFLAGS=-O0 builds at -O0, although setup.py asks for -O3."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="no setup.py beside the tests")
@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_user_cflags_come_after_the_project_s_flags(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # pyproject.toml's SPDX license
    user = ["-O0", "-DBNPY_USER_CFLAGS_PROBE"]
    build = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "temp"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CFLAGS": " ".join(user), "BNPY_NO_OPENMP": "1"},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    compiles = [
        shlex.split(line)
        for line in build.stdout.splitlines()
        if " -c " in line and "-DBNPY_USER_CFLAGS_PROBE" in line
    ]
    assert len(compiles) >= 10, build.stdout[-3000:]  # one per source file
    for command in compiles:
        project = command.index("-ffp-contract=off")  # one of setup.py's own flags
        assert "-O3" in command[:project] and project < command.index("-O0"), command
        assert [flag for flag in command if flag.startswith("-O")][-1] == "-O0", command
