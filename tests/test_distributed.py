"""bnpy.distributed.SyncBatchNorm: in one process, and under mpiexec with 2 and 3 ranks.

The multi-rank checks run tests/mpi/check_sync.py under mpiexec. They skip
when mpi4py or mpiexec is missing, except where BNPY_REQUIRE_MPI=1 (CI), in
which case they fail.
"""

import copy
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bnpy

HERE = Path(__file__).parent
REQUIRED = os.environ.get("BNPY_REQUIRE_MPI", "").lower() in ("1", "true", "yes", "on")


def _need(condition, why):
    if condition:
        return
    if REQUIRED:
        pytest.fail(f"{why}, and BNPY_REQUIRE_MPI=1")
    pytest.skip(why)


@pytest.fixture
def mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        _need(False, "mpi4py is not installed")
    return MPI


def test_import_bnpy_works_without_mpi4py():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import bnpy, bnpy.distributed\n"
        "try:\n    bnpy.distributed.SyncBatchNorm(3)\n"
        "except ImportError as e:\n    print('ImportError:', e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ImportError: bnpy.distributed needs mpi4py" in run.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_rank_is_plain_batchnorm(mpi, dtype):
    from bnpy.distributed import SyncBatchNorm

    rng = np.random.default_rng(0)
    sync = SyncBatchNorm(3, dtype=dtype, momentum=None)
    plain = bnpy.BatchNorm(3, dtype=dtype, momentum=None)
    for _ in range(2):
        x = rng.normal(5, 2, size=(8, 3, 4))
        dy = rng.normal(size=x.shape)
        np.testing.assert_allclose(sync(x), plain(x), rtol=0, atol=1e-6)
        np.testing.assert_allclose(sync.backward(dy), plain.backward(dy), rtol=0, atol=1e-5)
    np.testing.assert_allclose(sync.running_var, plain.running_var, rtol=1e-6)
    np.testing.assert_allclose(sync.grad_gamma, plain.grad_gamma, rtol=1e-5)
    assert sync.num_batches_tracked == plain.num_batches_tracked == 2
    sync.eval()
    plain.eval()
    x = rng.normal(5, 2, size=(4, 3, 4))  # eval: the running statistics, equal to rounding
    np.testing.assert_allclose(sync(x), plain(x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(sync.backward(x), plain.backward(x), rtol=1e-5)


def test_pickle_and_copy_keep_the_layer_but_not_the_communicator(mpi):
    from bnpy.distributed import SyncBatchNorm

    sync = SyncBatchNorm(3, comm=mpi.COMM_SELF, eps=1e-3, momentum=0.3, axis=-1, dtype=np.float64)
    sync(np.random.default_rng(1).normal(size=(5, 3)))
    for clone in (pickle.loads(pickle.dumps(sync)), copy.deepcopy(sync)):
        assert type(clone) is SyncBatchNorm and repr(clone) == repr(sync)
        np.testing.assert_array_equal(clone.running_mean, sync.running_mean)
        assert clone.num_batches_tracked == 1
        assert clone.comm == mpi.COMM_WORLD


def test_plain_backward_refuses_statistics_gathered_elsewhere():
    layer = bnpy.BatchNorm(2, dtype=np.float64)
    x = np.random.default_rng(2).normal(size=(3, 2))
    stats = layer._stats_of([x, x])  # as if another process held a copy of x
    layer._forward_from_stats(x, stats)
    with pytest.raises(RuntimeError, match="across processes"):
        layer.backward(np.ones_like(x))
    sums = layer._grad_sums(np.ones_like(x))
    dx = layer._backward_from_sums(np.ones_like(x), (2 * sums).ravel(), sums.ravel())
    assert dx.shape == x.shape


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_match_one_process_on_the_concatenated_batch(mpi, ranks):
    mpiexec = shutil.which(
        "mpiexec",
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    _need(mpiexec is not None, "mpiexec is not installed")
    command = [mpiexec, "-n", str(ranks), sys.executable, str(HERE / "mpi" / "check_sync.py")]
    package_root = str(Path(bnpy.__file__).parent.parent)  # the bnpy this test imported
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "BNPY_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SyncBatchNorm matches one process") == ranks


def test_forward_from_stats_checks_out_like_forward():
    """The hook shares forward's checks: out may not alias the layer's gamma."""
    layer = bnpy.BatchNorm(3, dtype=np.float64)
    x = np.random.default_rng(3).normal(size=(1, 3))
    stats = layer._stats_of([x, x + 1.0])
    with pytest.raises(ValueError, match="gamma"):
        layer._forward_from_stats(x, stats, out=layer.gamma.reshape(1, 3))
    np.testing.assert_array_equal(layer.gamma, np.ones(3))
