"""python -m bnpy's command line (issue 27): --version, argparse for every command
(--help prints help and runs nothing, an unknown flag exits 2 naming it), and a
progress counter that shows only on a terminal."""

import io
import subprocess
import sys

import pytest

import bnpy
from bnpy import nn
from bnpy._progress import Progress
from bnpy.data import spirals


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "bnpy", *args], capture_output=True, text=True, timeout=300
    )


def test_version_prints_the_package_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"bnpy {bnpy.__version__}"


@pytest.mark.parametrize("command", ["gradcheck", "demo", "bench"])
def test_every_command_prints_its_help_and_runs_nothing(command):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m bnpy {command}")
    assert "max_rel_error" not in result.stdout and "training" not in result.stdout.lower()


@pytest.mark.parametrize("command", ["gradcheck", "demo", "bench"])
def test_an_unknown_flag_exits_2_with_the_command_s_usage(command):
    result = run(command, "--no-such-flag")
    assert result.returncode == 2
    assert f"usage: python -m bnpy {command}" in result.stderr
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert result.stdout == ""


def test_bench_norms_picks_the_rows_from_the_command_line():
    result = run(
        "bench",
        "--quick",
        "--norms",
        "rms",
        "--threads",
        "1",
        "--dtypes",
        "float32",
        "--repeats",
        "1",
        "--no-torch",
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:4] for line in result.stdout.splitlines() if " float32 " in line]
    assert rows == [["RMSNorm", "8x16x32", "float32", op] for op in ("forward", "backward")]


def test_bench_refuses_an_unknown_norm_naming_the_choices():
    result = run("bench", "--norms", "layer,frob")
    assert result.returncode == 2
    assert "usage: python -m bnpy bench" in result.stderr
    assert (
        "argument --norms: unknown norm 'frob' "
        "(choose from batch, layer, group, instance, rms, family)"
    ) in result.stderr
    assert result.stdout == ""


def test_an_unknown_command_exits_2_naming_the_commands():
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr and "gradcheck" in result.stderr


def test_no_progress_is_drawn_when_stderr_is_not_a_terminal():
    result = run("gradcheck", "--fast")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "\r" not in result.stdout


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_counts_and_estimates_the_time_left(capsys):
    terminal = Terminal()
    with Progress(4, "case", stream=terminal) as progress:
        progress.advance()
        assert progress.text().startswith("case 1/4 (25%), 0 s, about ")
        assert progress.text().endswith(" s left")
        progress.print("a line of results")
        for _ in range(3):
            progress.advance()
        assert progress.text() == "case 4/4 (100%), 0 s"  # nothing left to estimate
    drawn = terminal.getvalue()
    assert "\rcase 0/4 (0%)" in drawn.replace("\x1b[K", "")
    assert "case 4/4 (100%)" in drawn
    assert drawn.endswith("\r\x1b[K")  # closed: the counter is wiped off the line
    assert capsys.readouterr().out == "a line of results\n"


def test_progress_elsewhere_writes_nothing_but_the_printed_lines(capsys):
    pipe = io.StringIO()
    with Progress(2, "case", stream=pipe) as progress:
        progress.advance()
        progress.print("result")
    assert pipe.getvalue() == ""
    assert capsys.readouterr().out == "result\n"


def test_fit_calls_on_step_after_every_step():
    x, labels = spirals(10, rng=0)
    model = nn.mlp(2, 3, width=8, depth=2, rng=0)
    calls = []
    nn.fit(
        model,
        x,
        labels,
        lr=0.1,
        steps=7,
        batch_size=8,
        rng=0,
        on_step=lambda: calls.append(len(calls)),
    )
    assert calls == list(range(7))
