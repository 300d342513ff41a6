"""Property-based tests (issue 6) with hypothesis, against bnpy/reference.py.

Inputs: 2 to 5 dimensions, zero-length and size-1 axes included, any feature
axis (negative too), float32 and float64, random strides (any step, negative
steps, any memory order of the axes, byte-swapped), values from several
distributions (normal with an offset, a few integers so that features can be
constant or two-valued). Layers: train or eval, affine or not, tracked or not,
momentum a number, 0, 1 or None, preset running statistics.

Properties:
- a non-contiguous input gives bitwise what its C-contiguous copy gives (the
  memory the view skips holds NaN, so reading outside the view shows);
- outputs, gradients and running statistics agree with the float64 reference
  to the dtype's precision;
- an empty batch gives empty outputs, zero dgamma/dbeta and changes no
  statistics; training on one value per feature raises ValueError and changes
  nothing.

tests/conftest.py loads the "ci" profile (derandomized) when CI is set.
"""

import numpy as np
import pytest
from bitwise import bits
from hypothesis import assume, given, note
from hypothesis import strategies as st

import bnpy
from bnpy import reference

TOL = {np.float32: 2e-5, np.float64: 1e-10}


# --- strategies -----------------------------------------------------------------------


@st.composite
def layouts(draw):
    """(shape, axis, steps, order, byteswap): an input geometry."""
    ndim = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape[axis] = draw(st.integers(1, 5))  # at least one feature
    # keep examples small; the kernels' tiling is tested with large inputs elsewhere
    assume(int(np.prod(shape)) <= 2000)
    steps = draw(st.lists(st.sampled_from([1, 1, 2, 3, -1, -2]), min_size=ndim, max_size=ndim))
    order = draw(st.permutations(range(ndim)))
    byteswap = draw(st.booleans())
    return tuple(shape), axis, tuple(steps), tuple(order), byteswap


DISTRIBUTIONS = ["normal", "offset", "integers", "constant-feature"]


def values(shape, axis, dtype, distribution, seed):
    rng = np.random.default_rng(seed)
    if distribution == "normal":
        x = rng.standard_normal(shape) * rng.uniform(0.1, 5.0)
    elif distribution == "offset":
        x = rng.standard_normal(shape) + rng.uniform(-1e3, 1e3)
    elif distribution == "integers":  # ties, constant and two-valued features
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
    else:
        x = rng.standard_normal(shape)
        moved = np.moveaxis(x, axis, 0)
        moved[0] = rng.uniform(-10, 10)
    return x.astype(dtype)


def strided(a, steps, order, byteswap):
    """a's values in a view with the given steps and memory order of axes; the
    memory between the view's elements holds NaN."""
    dtype = a.dtype.newbyteorder() if byteswap else a.dtype
    memory_shape = [a.shape[p] * abs(steps[p]) for p in order]
    base = np.full(memory_shape, np.nan, dtype)
    view = base.transpose(np.argsort(order))  # axes back in a's order
    view = view[tuple(slice(None, None, s) for s in steps)]
    assert view.shape == a.shape
    view[...] = a
    return view


def contiguous(a):
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


def is_dense(a):
    """a's elements fill one block with positive steps in some axis order"""
    block = a.itemsize
    for stride, dim in sorted((s, d) for s, d in zip(a.strides, a.shape) if d > 1):
        if stride != block:
            return a.size == 0
        block *= dim
    return True


def as_kernels_see_it(a, dtype):
    """A copy of what the kernels run on: a itself (its layout kept) when it
    is dense, aligned and of the layer's native dtype; else a C-contiguous copy."""
    if a.dtype == dtype and a.dtype.isnative and a.flags.aligned and is_dense(a):
        return a.copy(order="K")
    return contiguous(a)


# --- comparison helpers ------------------------------------------------------------------


def per_feature(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, np.float64).reshape(shape)


def assert_close(got, want, atol, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.abs(got - want)
    assert np.all(err <= atol), f"{what}: max error {np.max(err):.3g} > {np.max(atol):.3g}"


def check_forward_backward(
    y, dx, dgamma, dbeta, x, dy, gamma, beta, mean, var, eps, axis, training, dtype, check_y=True
):
    """y, dx, dgamma, dbeta against the reference for given (float64) statistics."""
    tol = TOL[dtype]
    ndim = x.ndim
    if check_y:
        y_ref = reference.normalize(x, mean, var, gamma, beta, eps, axis)
        assert_close(y, y_ref, tol * (1 + np.max(np.abs(y_ref), initial=0)), "y")
    dx_ref, dg_ref, db_ref = reference.backward(dy, x, mean, var, gamma, eps, axis, training)
    # error bounds from the size of what is summed, not of the (possibly
    # cancelled) result
    invstd = 1 / np.sqrt(np.asarray(var, np.float64) + eps)
    g = np.ones_like(invstd) if gamma is None else np.abs(np.asarray(gamma, np.float64))
    xhat = (np.asarray(x, np.float64) - per_feature(mean, ndim, axis)) * per_feature(
        invstd, ndim, axis
    )
    others = tuple(a for a in range(ndim) if a != axis % ndim)
    abs_dy = np.abs(np.asarray(dy, np.float64))
    sum_dy = abs_dy.sum(axis=others)
    sum_dy_xhat = (abs_dy * np.abs(xhat)).sum(axis=others)
    dx_scale = per_feature(g * invstd, ndim, axis) * (
        abs_dy
        + per_feature(sum_dy + sum_dy_xhat, ndim, axis)
        * (np.abs(xhat) + 1)
        / max(1, x.size // x.shape[axis])
    )
    assert_close(dx, dx_ref, tol * (dx_scale + np.abs(dx_ref)) * 4, "dx")
    if dgamma is not None:
        # and the reference's own error: its float64 mean is rounded, which
        # shifts x_hat by about invstd * |mean| * 1e-16 -- visible when a
        # constant feature makes invstd = 1/sqrt(eps) and x_hat = 0 exactly
        xhat_error = invstd * (np.abs(np.asarray(mean, np.float64)) + 1) * 1e-13
        assert_close(
            dgamma, dg_ref, tol * (sum_dy_xhat + 1e-30) * 4 + sum_dy * xhat_error, "dgamma"
        )
        assert_close(dbeta, db_ref, tol * (sum_dy + 1e-30) * 4, "dbeta")


# --- the layer --------------------------------------------------------------------------


@given(
    layout=layouts(),
    dtype=st.sampled_from([np.float32, np.float64]),
    distribution=st.sampled_from(DISTRIBUTIONS),
    training=st.booleans(),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.0, 1.0, 0.5, None]),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    preset=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_layer_matches_reference(
    layout, dtype, distribution, training, affine, track, momentum, eps, preset, seed
):
    shape, axis, steps, order, byteswap = layout
    c = shape[axis]
    n = int(np.prod(shape)) // c
    rng = np.random.default_rng(seed)
    x0 = values(shape, axis, dtype, distribution, seed)
    dy0 = (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)
    x, dy = strided(x0, steps, order, byteswap), strided(dy0, steps, order, byteswap)
    note(f"x strides {x.strides}, dtype {x.dtype.str}")

    def make():
        bn = bnpy.BatchNorm(
            c,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track,
            axis=axis,
            dtype=dtype,
        )
        r = np.random.default_rng(seed + 1)
        if affine:
            bn.gamma = r.uniform(0.5, 2.0, c) * r.choice([-1.0, 1.0], c)
            bn.beta = r.uniform(-1.0, 1.0, c)
        if track and preset:
            bn.running_mean = r.uniform(-2.0, 2.0, c)
            bn.running_var = r.uniform(0.25, 4.0, c)
        return bn.train(training)

    bn, twin = make(), make()
    before = {k: bits(v) for k, v in bn.state_dict().items()}
    batch_stats = training or not track
    if batch_stats and n == 1:
        with pytest.raises(ValueError, match="more than 1 value"):
            bn(x)
        assert {k: bits(v) for k, v in bn.state_dict().items()} == before
        return

    y = bn(x)
    dx = bn.backward(dy)
    assert y.dtype == dtype and y.shape == shape and dx.shape == shape
    # layout does not matter, to the bit, beyond the order in which the
    # kernels meet the values (a layout kept)
    assert bits(twin(as_kernels_see_it(x, dtype))) == bits(y)
    assert bits(twin.backward(as_kernels_see_it(dy, dtype))) == bits(dx)
    assert bits(twin.grad_gamma) == bits(bn.grad_gamma)
    assert {k: bits(v) for k, v in twin.state_dict().items()} == {
        k: bits(v) for k, v in bn.state_dict().items()
    }

    if n == 0:  # an empty batch: nothing to learn from it
        assert {k: bits(v) for k, v in bn.state_dict().items()} == before
        if affine:
            assert bits(bn.grad_gamma) == bits(np.zeros(c, dtype))
            assert bits(bn.grad_beta) == bits(np.zeros(c, dtype))
        return

    gamma = None if not affine else np.asarray(bn.gamma, np.float64)
    beta = None if not affine else np.asarray(bn.beta, np.float64)
    x64 = np.asarray(x0, np.float64)
    if batch_stats:
        mean, var = reference.batch_stats(x64, axis)
    else:
        mean = np.frombuffer(before["running_mean"][2], dtype).astype(np.float64)
        var = np.frombuffer(before["running_var"][2], dtype).astype(np.float64)
    check_forward_backward(
        y,
        dx,
        bn.grad_gamma,
        bn.grad_beta,
        x64,
        dy0,
        gamma,
        beta,
        mean,
        var,
        eps,
        axis,
        batch_stats,
        dtype,
    )
    if not affine:
        assert bn.grad_gamma is None and bn.grad_beta is None

    if track:
        old_mean = np.frombuffer(before["running_mean"][2], dtype).astype(np.float64)
        old_var = np.frombuffer(before["running_var"][2], dtype).astype(np.float64)
        if training:
            factor = 1.0 if momentum is None else momentum
            want_mean, want_var = reference.update_running(old_mean, old_var, mean, var, n, factor)
            assert bn.num_batches_tracked == 1
        else:
            want_mean, want_var = old_mean, old_var
            assert bn.num_batches_tracked == 0
        tol = TOL[dtype]
        assert_close(bn.running_mean, want_mean, tol * (1 + np.abs(want_mean)), "running_mean")
        assert_close(bn.running_var, want_var, tol * (1 + np.abs(want_var)), "running_var")
    else:
        assert bn.running_mean is None and bn.num_batches_tracked == 0


# --- the functional API ---------------------------------------------------------------------


@given(
    layout=layouts(),
    dtype=st.sampled_from([np.float32, np.float64]),
    distribution=st.sampled_from(DISTRIBUTIONS),
    affine=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_functional_matches_reference(layout, dtype, distribution, affine, eps, seed):
    shape, axis, steps, order, byteswap = layout
    c = shape[axis]
    n = int(np.prod(shape)) // c
    rng = np.random.default_rng(seed)
    x0 = values(shape, axis, dtype, distribution, seed)
    dy0 = (rng.standard_normal(shape) + 0.3).astype(dtype)
    x, dy = strided(x0, steps, order, byteswap), strided(dy0, steps, order, byteswap)
    gamma = (
        (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype) if affine else None
    )
    beta = rng.uniform(-1.0, 1.0, c).astype(dtype) if affine else None
    run_mean = rng.uniform(-2, 2, c).astype(dtype)
    run_var = rng.uniform(0.25, 4, c).astype(dtype)

    def calls(x, dy):
        out = {
            "inference": bnpy.batch_norm_inference(
                x, gamma, beta, run_mean, run_var, eps=eps, axis=axis
            )
        }
        run_invstd = (1 / np.sqrt(run_var.astype(np.float64) + eps)).astype(dtype)
        out["eval-backward"] = bnpy.batch_norm_backward(
            dy, x, gamma, run_mean, run_invstd, axis=axis, training=False
        )
        if n == 1:
            with pytest.raises(ValueError, match="more than 1 value"):
                bnpy.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis)
            return out
        out["forward"] = _y, mean, invstd = bnpy.batch_norm_forward(
            x, gamma, beta, eps=eps, axis=axis
        )
        out["backward"] = bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis)
        return out

    got = calls(x, dy)
    flat = {k: [bits(a) for a in (v if isinstance(v, tuple) else (v,))] for k, v in got.items()}
    # bitwise the same as on what the kernels run on: x as it lies when its
    # layout is kept (another order of summation than C order), else a copy
    again = calls(as_kernels_see_it(x, dtype), as_kernels_see_it(dy, dtype))
    assert flat == {
        k: [bits(a) for a in (v if isinstance(v, tuple) else (v,))] for k, v in again.items()
    }
    for v in got.values():
        for a in v if isinstance(v, tuple) else (v,):
            assert a is None or a.dtype == dtype

    if n == 0:
        assert got["inference"].shape == shape
        _, dg, db = got["eval-backward"]
        if affine:
            assert bits(dg) == bits(np.zeros(c, dtype)) and bits(db) == bits(np.zeros(c, dtype))
        return

    x64 = np.asarray(x0, np.float64)
    g64 = None if gamma is None else gamma.astype(np.float64)
    b64 = None if beta is None else beta.astype(np.float64)
    tol = TOL[dtype]
    y_ref = reference.forward_eval(x64, run_mean, run_var, g64, b64, eps, axis)
    assert_close(got["inference"], y_ref, tol * (1 + np.abs(y_ref).max()), "inference")
    # backward takes the statistics as arguments: the reference uses exactly
    # those (float32 ones are rounded, which matters with a large offset)
    dx, dg, db = got["eval-backward"]
    run_invstd = (1 / np.sqrt(run_var.astype(np.float64) + eps)).astype(dtype)
    check_forward_backward(
        got["inference"],
        dx,
        dg,
        db,
        x64,
        dy0,
        g64,
        b64,
        run_mean.astype(np.float64),
        1 / run_invstd.astype(np.float64) ** 2 - eps,
        eps,
        axis,
        False,
        dtype,
        check_y=False,
    )
    if n > 1:
        y, mean, invstd = got["forward"]
        mean_ref, var_ref = reference.batch_stats(x64, axis)
        assert_close(mean, mean_ref, tol * (1 + np.abs(mean_ref)), "mean")
        invstd_ref = 1 / np.sqrt(var_ref + eps)
        assert_close(invstd, invstd_ref, tol * invstd_ref * 4, "invstd")
        y_ref = reference.normalize(x64, mean_ref, var_ref, g64, b64, eps, axis)
        assert_close(y, y_ref, tol * (1 + np.abs(y_ref).max()), "y")
        dx, dg, db = got["backward"]
        check_forward_backward(
            y,
            dx,
            dg,
            db,
            x64,
            dy0,
            g64,
            b64,
            mean.astype(np.float64),
            1 / invstd.astype(np.float64) ** 2 - eps,
            eps,
            axis,
            True,
            dtype,
            check_y=False,
        )
