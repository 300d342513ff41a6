"""Shared pytest fixtures.

The ``torch`` fixture: tests that compare bnpy with PyTorch ask for it and
skip when torch is not installed. CI installs torch and sets
``BNPY_REQUIRE_TORCH=1``; then a missing torch is a failure, not a skip, so
that the comparison cannot silently stop running. The ``capability`` fixture
sets the kernels' instruction set for one test; ``run_python`` runs code in a
new interpreter with environment variables set.
"""

import os
import subprocess
import sys

import pytest

_TRUE_VALUES = ("1", "true", "yes", "on")


def _torch_required():
    return os.environ.get("BNPY_REQUIRE_TORCH", "").strip().lower() in _TRUE_VALUES


@pytest.fixture(scope="session")
def torch():
    """The imported torch module, or skip (fail under BNPY_REQUIRE_TORCH=1)."""
    try:
        import torch as torch_module
    except ImportError as exc:
        if _torch_required():
            pytest.fail(
                "BNPY_REQUIRE_TORCH=1 is set but torch cannot be imported "
                f"({type(exc).__name__}: {exc}); install torch or unset the variable",
                pytrace=False,
            )
        pytest.skip(f"torch is not installed ({exc}); set BNPY_REQUIRE_TORCH=1 to fail instead")
    # One thread: reductions are then deterministic, and the small tensors of
    # the tests gain nothing from threads on a shared CI machine. Every test
    # names its dtypes explicitly, so torch's default dtype is left alone.
    torch_module.set_num_threads(1)
    return torch_module


@pytest.fixture
def capability():
    """Set the kernels' instruction set for a test (bnpy.set_cpu_capability),
    and put the original back after."""
    import bnpy

    before = bnpy.get_cpu_capability()
    yield bnpy.set_cpu_capability
    bnpy.set_cpu_capability(before)


@pytest.fixture
def run_python():
    """run(code, NAME=value, ...): `python -c code` in a new interpreter whose
    environment is this one's with those variables set (None: removed);
    returns the CompletedProcess, output as text."""

    def run(code, **variables):
        env = {k: v for k, v in os.environ.items() if k not in variables}
        env.update({k: v for k, v in variables.items() if v is not None})
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    return run


# --- hypothesis profiles ------------------------------------------------------
# CI sets CI=true: examples are then derandomized (the same on every run, so a
# failure reproduces and CI never flakes on a newly drawn example) and no
# example database is written. Elsewhere examples are drawn afresh each run.
# Both keep the number of examples modest so that the suite stays fast;
# HYPOTHESIS_PROFILE=thorough runs many more, by hand.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a test extra: only tests/test_properties.py needs it
    pass
else:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile(
        "ci", max_examples=100, derandomize=True, database=None, print_blob=True, **_common
    )
    settings.register_profile("dev", max_examples=100, **_common)
    settings.register_profile("thorough", max_examples=2000, **_common)
    _in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _in_ci else "dev"))
