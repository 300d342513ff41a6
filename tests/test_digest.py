"""benchmarks/digest.py: the SHA-256 that shows a kernel change kept every
result's bits."""

import importlib.util
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import bnpy

DIGEST_LINES = re.compile(r"digest [0-9a-f]{64}\nfamily [0-9a-f]{64}")


@pytest.fixture(scope="module")
def digest():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "digest.py"
    spec = importlib.util.spec_from_file_location("digest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_build_and_thread_count_gives_the_one_digest(digest, capsys):
    assert digest.main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip()
    assert DIGEST_LINES.fullmatch(lines), lines
    assert lines.split()[1] == digest.digest(digest.QUICK_SHAPES)
    assert lines.split()[3] == digest.family_digest(digest.QUICK_FAMILY_SHAPES)


def test_one_changed_bit_in_one_result_changes_the_digest(digest, monkeypatch):
    want = digest.digest(digest.QUICK_SHAPES)
    assert digest.digest(digest.QUICK_SHAPES) == want  # deterministic
    results_of = digest.results_of

    def one_bit_off(shape, dtype, seed):
        for k, a in enumerate(results_of(shape, dtype, seed)):
            if seed == 1 and dtype == np.float64 and k == 7:  # running_var of the 2nd shape
                a = a.copy()
                a.view(np.uint64)[-1] ^= 1
            yield a

    monkeypatch.setattr(digest, "results_of", one_bit_off)
    assert digest.digest(digest.QUICK_SHAPES) != want


def test_one_changed_bit_in_a_family_result_changes_its_digest(digest, monkeypatch):
    want = digest.family_digest(digest.QUICK_FAMILY_SHAPES)
    family_results_of = digest.family_results_of

    def one_bit_off(shape, dtype, seed):
        for k, a in enumerate(family_results_of(shape, dtype, seed)):
            if seed == 0 and dtype == np.float32 and k == 9:  # RMS norm's dx
                a = a.copy()
                a.reshape(-1).view(np.uint32)[0] ^= 1
            yield a

    monkeypatch.setattr(digest, "family_results_of", one_bit_off)
    assert digest.family_digest(digest.QUICK_FAMILY_SHAPES) != want


@pytest.mark.skipif(not bnpy.has_openmp(), reason="one thread only without OpenMP")
def test_settings_that_disagree_are_named_and_left_as_they_were(digest, monkeypatch, capsys):
    build, threads = bnpy.get_cpu_capability(), bnpy.get_num_threads()
    monkeypatch.setattr(
        digest, "digest", lambda shapes: "b" * 64 if bnpy.get_num_threads() == 2 else "a" * 64
    )
    assert digest.main(["--quick"]) == 1
    out = capsys.readouterr().out
    assert "disagree" in out
    for cap in bnpy.cpu_capabilities():
        assert f"{cap:<8} 1 thread  {'a' * 64}" in out
        assert f"{cap:<8} 2 threads  {'b' * 64}" in out
    assert (bnpy.get_cpu_capability(), bnpy.get_num_threads()) == (build, threads)


def test_versions_are_digested_each_in_a_process_of_its_own(digest, capsys):
    built = os.path.dirname(os.path.dirname(bnpy.__file__))  # where this bnpy is
    assert digest.main(["--quick", built, built]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = digest.digest(digest.QUICK_SHAPES)
    assert [line.split()[-1] for line in lines[:2]] == [want, want]
    assert lines[2] == "the same bits"


def test_a_version_without_its_own_built_core_is_refused(digest, tmp_path):
    """whether or not an installed bnpy stands behind it"""
    empty, unbuilt = tmp_path / "empty", tmp_path / "unbuilt"
    empty.mkdir()
    shutil.copytree(
        Path(bnpy.__file__).parent,
        unbuilt / "bnpy",
        ignore=shutil.ignore_patterns("_core*.so", "_core*.pyd", "__pycache__"),
    )
    for directory in (empty, unbuilt):
        with pytest.raises(RuntimeError, match=re.escape(os.path.realpath(directory))):
            digest.digest_of_version(str(directory), quick=True)
