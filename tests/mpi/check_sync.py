"""SyncBatchNorm across MPI ranks against one process on the concatenated batch.

    mpiexec -n 3 python tests/mpi/check_sync.py

Every rank builds the same data (same seeds), keeps its own slice of each
global batch (rank sizes 5, 1, 0 on three ranks; zero included), and checks
y, dx, the running statistics, num_batches_tracked and calibrate against a
plain BatchNorm run on the whole batch; grad_gamma and grad_beta summed over
the ranks against the single-process gradients. Exits non-zero on any
mismatch (mpiexec then fails too); prints one line per rank.
"""

import sys

import numpy as np
from mpi4py import MPI

import bnpy
from bnpy.distributed import SyncBatchNorm

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
SIZES = {1: [6], 2: [4, 3], 3: [5, 1, 0]}.get(SIZE, [3] * SIZE)
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.max(np.abs(want), initial=0.0), 1e-300)
    err = np.max(np.abs(got - want), initial=0.0) / scale
    if not err <= TOL[dtype]:
        raise AssertionError(f"rank {RANK}: {what}: relative error {err:.3g} > {TOL[dtype]}")


def my_slice(total_shape, axis=0):
    """This rank's rows of a global batch along axis 0."""
    start = sum(SIZES[:RANK])
    return slice(start, start + SIZES[RANK])


def check_training(shape_rest, axis, dtype, momentum, offset):
    rng = np.random.default_rng(7)
    n = sum(SIZES)
    channels = shape_rest[axis - 1] if axis > 0 else shape_rest[axis]
    sync = SyncBatchNorm(channels, axis=axis, dtype=dtype, momentum=momentum)
    single = bnpy.BatchNorm(channels, axis=axis, dtype=dtype, momentum=momentum)
    gamma, beta = rng.normal(size=channels), rng.normal(size=channels)
    for layer in (sync, single):
        layer.gamma, layer.beta = gamma, beta
    mine = my_slice(n)
    for step in range(3):
        x = rng.normal(offset, 2.0, size=(n,) + shape_rest).astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        y_all, y = single(x), sync(x[mine])
        dx_all, dx = single.backward(dy), sync.backward(dy[mine])
        close(y, y_all[mine], dtype, f"step {step} y")
        close(dx, dx_all[mine], dtype, f"step {step} dx")
        grads = np.array([sync.grad_gamma, sync.grad_beta], dtype=np.float64)
        summed = np.empty_like(grads)
        COMM.Allreduce(grads, summed, op=MPI.SUM)
        close(summed[0], single.grad_gamma, dtype, "sum of grad_gamma")
        close(summed[1], single.grad_beta, dtype, "sum of grad_beta")
        close(sync.running_mean, single.running_mean, dtype, "running_mean")
        close(sync.running_var, single.running_var, dtype, "running_var")
        assert sync.num_batches_tracked == single.num_batches_tracked == step + 1
    # eval: running statistics, no communication, same as one process
    x = rng.normal(offset, 2.0, size=(n,) + shape_rest).astype(dtype)
    close(sync.eval()(x[mine]), single.eval()(x)[mine], dtype, "eval y")
    # calibrate: batches of different sizes on every rank, exact statistics
    batches = [rng.normal(offset, 3.0, size=(k,) + shape_rest).astype(dtype) for k in (4, 9, 2)]
    per_rank = [[b[r::SIZE] for b in batches] for r in range(SIZE)]
    sync.calibrate(per_rank[RANK])
    single.calibrate([part for rank_batches in per_rank for part in rank_batches])
    close(sync.running_mean, single.running_mean, dtype, "calibrated mean")
    close(sync.running_var, single.running_var, dtype, "calibrated var")


def check_rejection_reaches_every_rank():
    """A bad input on one rank makes every rank raise, and nobody hangs."""
    bn = SyncBatchNorm(3, dtype=np.float64)
    x = np.zeros((2, 4)) if RANK == SIZE - 1 else np.random.default_rng(RANK).normal(size=(4, 3))
    try:
        bn(x)
    except (ValueError, RuntimeError) as error:
        expected = ValueError if RANK == SIZE - 1 else RuntimeError
        assert isinstance(error, expected), (RANK, error)
    else:
        raise AssertionError(f"rank {RANK}: a rejected input on rank {SIZE - 1} did not raise")
    bn(np.random.default_rng(RANK).normal(size=(4, 3)))  # the layers go on working
    assert bn.num_batches_tracked == 1


def main():
    for dtype in (np.float64, np.float32):
        check_training((4,), 1, dtype, 0.1, 0.0)  # (N, C)
        # an offset: not 1e4, where the last bit of a mean of six values is already
        # 1e-12 of the gradient sums, and two exact computations differ by that much
        check_training((3, 5), 1, dtype, None, 50.0)  # (N, C, L), cumulative
        check_training((2, 3, 4), -1, dtype, 1.0, 1.0)  # channels-last (N, H, W, C)
    if SIZE > 1:
        check_rejection_reaches_every_rank()
    print(f"rank {RANK} of {SIZE}: SyncBatchNorm matches one process")


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # make mpiexec fail instead of hanging the other ranks
        print(f"rank {RANK} FAILED: {error!r}", file=sys.stderr, flush=True)
        COMM.Abort(1)
