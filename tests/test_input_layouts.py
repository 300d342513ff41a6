"""Every input layout gives what a C-contiguous copy gives, bit for bit (issue 6),
except the layouts kept (issue 26): to rounding, with x's strides.

The binding runs the kernels on an aligned, native-order input of the right
dtype whose elements fill one block of memory in some axis order (Fortran
order, transposes: KEPT below) as it lies, and y and dx get its strides;
those agree with the C-contiguous case to rounding (another order of
summation). Every other input is copied C-contiguous, so the kernels see the
same values in the same order: results must be bitwise identical.
Covered: Fortran order, strided, reversed and transposed views, misaligned
buffers (np.frombuffer at an odd offset), byte-swapped arrays ('>f8', '>f4'),
read-only arrays, zero-stride broadcasts (np.broadcast_to), and combinations,
for the layer (forward, backward, setters, load_state_dict) and the functional
API (every array argument).

Then out=: every bad out (read-only, wrong shape, wrong dtype, byte-swapped,
not contiguous, misaligned, not an ndarray, partly overlapping an input) raises
and writes nothing, for every function that takes out; out=x (forward) and
out=dy (backward) exactly are allowed and give the same bits.
"""

import numpy as np
import pytest
from bitwise import bits

import bnpy

C = 4
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
LAYOUTS = {
    "interleaved": ((6, C), 1),
    "planar": ((3, C, 5), 1),
    "channels-last": ((2, 3, C), -1),
    "middle-axis": ((2, 3, C, 2), 2),
}


def data(shape, seed, dtype):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + rng.uniform(-3, 3)).astype(dtype)


def native_copy(a):
    """The reference input: a C-contiguous, aligned, native-order copy."""
    a = np.asarray(a)
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


# --- layout variants ------------------------------------------------------------


def _misaligned(a, writable):
    raw = b"\x00" + a.tobytes()
    buf = bytearray(raw) if writable else raw
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    assert not out.flags.aligned
    assert out.flags.writeable == writable
    return out


def _strided(a, misaligned=False):
    """A view with step 2 on the first axis and 3 on the last one (step 3 on a
    vector's one axis)."""
    if a.ndim == 1:
        shape, index = (3 * a.shape[0],), (slice(None, None, 3),)
    else:
        shape = (2 * a.shape[0],) + a.shape[1:-1] + (3 * a.shape[-1],)
        index = (slice(None, None, 2),) + (slice(None),) * (a.ndim - 2) + (slice(None, None, 3),)
    big = np.full(shape, 77, a.dtype)
    if misaligned:
        big = _misaligned(big, writable=True)
    big[index] = a
    return big[index]


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _byteswapped(a):
    return a.astype(a.dtype.newbyteorder(">" if np.little_endian else "<"))


VARIANTS = {
    "fortran": np.asfortranarray,
    "strided": _strided,
    "reversed": lambda a: np.flip(np.flip(a).copy()),  # negative strides on every axis
    "transposed": lambda a: np.ascontiguousarray(a.T).T,
    "offset-view": lambda a: np.concatenate([a.ravel()[:1], a.ravel()])[1:].reshape(a.shape),
    "misaligned": lambda a: _misaligned(a, writable=False),
    "misaligned-writable": lambda a: _misaligned(a, writable=True),
    "byteswapped": _byteswapped,
    "big-endian-f8": lambda a: a.astype(">f8"),  # exact for float32 values too
    "read-only": _readonly,
    "byteswapped-fortran": lambda a: np.asfortranarray(_byteswapped(a)),
    "misaligned-strided": lambda a: _strided(a, misaligned=True),
    "reversed-read-only": lambda a: _readonly(np.flip(np.flip(a).copy())),
}


# dense in another axis order: run as they lie, not copied
KEPT = ("fortran", "transposed")
COPIED = [name for name in VARIANTS if name not in KEPT]


def variant(name, a):
    v = VARIANTS[name](a)
    assert np.array_equal(v, a)  # the same values ...
    assert v is not a
    return v


def inputs(name, layout, dtype):
    """shape, axis, x and dy C-contiguous, and x and dy in variant `name`"""
    shape, axis = LAYOUTS[layout]
    x0, dy0 = data(shape, 1, dtype), data(shape, 2, dtype)
    return shape, axis, x0, dy0, variant(name, x0), variant(name, dy0)


def test_variants_really_differ_in_layout():
    a = data((3, C, 5), 0, np.float64)
    assert not variant("fortran", a).flags.c_contiguous
    assert not variant("strided", a).flags.c_contiguous
    assert all(s < 0 for s in variant("reversed", a).strides)
    assert not variant("transposed", a).flags.c_contiguous
    assert not variant("misaligned", a).flags.aligned
    assert not variant("byteswapped", a).dtype.isnative
    assert variant("big-endian-f8", a).dtype.str == ">f8"
    assert not variant("read-only", a).flags.writeable
    assert not variant("misaligned-strided", a).flags.aligned


def vector_variants(v):
    """(C,) vectors in other layouts, zero stride included."""
    out = {
        name: variant(name, v)
        for name in (
            "strided",
            "reversed",
            "misaligned",
            "byteswapped",
            "big-endian-f8",
            "read-only",
        )
    }
    out["broadcast-scalar"] = np.broadcast_to(v[:1], v.shape)  # zero stride
    return out


# --- the layer ------------------------------------------------------------------


def make_layer(dtype, axis, mode="train"):
    bn = bnpy.BatchNorm(C, axis=axis, dtype=dtype, momentum=0.3, eps=1e-3)
    bn.gamma[:] = [0.5, -1.5, 2.0, 1.25]
    bn.beta[:] = [0.25, 0.0, -1.0, 3.0]
    bn.running_mean[:] = [0.5, -0.5, 1.0, 2.0]
    bn.running_var[:] = [2.0, 0.5, 1.5, 3.0]
    return bn.train(mode == "train")


def run_layer(dtype, axis, mode, x, dy):
    """Everything a layer computes for x and dy, as bits."""
    bn = make_layer(dtype, axis, mode)
    y = bn(x)
    dx = bn.backward(dy)
    return {
        "y": bits(y),
        "dx": bits(dx),
        "grad_gamma": bits(bn.grad_gamma),
        "grad_beta": bits(bn.grad_beta),
        **{k: bits(v) for k, v in bn.state_dict().items()},
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", COPIED)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("layer_dtype", DTYPES)
@pytest.mark.parametrize("input_dtype", DTYPES)
def test_layer_any_layout_bitwise(input_dtype, layer_dtype, layout, name, mode):
    shape, axis = LAYOUTS[layout]
    x0, dy0 = data(shape, 1, input_dtype), data(shape, 2, input_dtype)
    x, dy = variant(name, x0), variant(name, dy0)
    x_bits, dy_bits = bits(x), bits(dy)
    want = run_layer(layer_dtype, axis, mode, x0, dy0)
    got = run_layer(layer_dtype, axis, mode, x, dy)
    assert got == want
    assert bits(x) == x_bits and bits(dy) == dy_bits  # inputs untouched


ROUNDING = {np.float32: dict(rtol=2e-6, atol=2e-6), np.float64: dict(rtol=1e-13, atol=1e-13)}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", KEPT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_kept_layout_to_rounding_with_x_strides(dtype, layout, name, mode):
    _shape, axis, x0, dy0, x, dy = inputs(name, layout, dtype)
    results = []
    for xs, dys in ((x0, dy0), (x, dy)):
        bn = make_layer(dtype, axis, mode)
        y = bn(xs)
        dx = bn.backward(dys)
        results.append([y, dx, bn.grad_gamma, bn.grad_beta, bn.running_mean, bn.running_var])
    for want, got in zip(*results):
        np.testing.assert_allclose(got, want, **ROUNDING[dtype])
    y, dx = results[1][:2]
    assert y.strides == x.strides and dx.strides == x.strides
    assert np.shares_memory(make_layer(dtype, axis, "eval")(x, out=x), x)  # in place


@pytest.mark.parametrize("name", KEPT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_kept_layout_to_rounding_with_x_strides(dtype, layout, name):
    _shape, axis, x0, dy0, x, dy = inputs(name, layout, dtype)
    gamma, beta, mean, var = _stats(dtype)
    y, m, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=axis)
    y0, m0, invstd0 = bnpy.batch_norm_forward(x0, gamma, beta, axis=axis)
    yi = bnpy.batch_norm_inference(x, gamma, beta, mean, var, axis=axis)
    dx, dg, db = bnpy.batch_norm_backward(dy, x, gamma, m, invstd, axis=axis)
    dx0, dg0, db0 = bnpy.batch_norm_backward(dy0, x0, gamma, m0, invstd0, axis=axis)
    for got, want in [
        (y, y0),
        (m, m0),
        (invstd, invstd0),
        (dx, dx0),
        (dg, dg0),
        (db, db0),
        (yi, bnpy.batch_norm_inference(x0, gamma, beta, mean, var, axis=axis)),
    ]:
        np.testing.assert_allclose(got, want, **ROUNDING[dtype])
    assert y.strides == yi.strides == dx.strides == x.strides


def test_channels_last_seen_as_nchw_runs_on_its_memory():
    """The case of the issue: an NHWC block viewed as NCHW with axis=1."""
    nhwc = data((4, 5, 6, C), 3, np.float32)
    x = nhwc.transpose(0, 3, 1, 2)
    assert not x.flags.c_contiguous
    bn = bnpy.BatchNorm(C).eval()
    y = bn(x)
    assert y.strides == x.strides
    np.testing.assert_allclose(
        y, bnpy.BatchNorm(C).eval()(np.ascontiguousarray(x)), **ROUNDING[np.float32]
    )
    bn(x, out=x)  # in place: no copy was made, so backward has no input
    with pytest.raises(RuntimeError, match="wrote its output over its input"):
        bn.backward(y)


def test_out_in_another_layout_gets_y_in_its_layout():
    """A C-contiguous out for a Fortran x (and the reverse): x is read in
    out's layout, as before layouts were kept."""
    x0 = data((6, C, 5), 4, np.float64)
    want = bnpy.BatchNorm(C, dtype=np.float64)(x0)
    for x, out in (
        (np.asfortranarray(x0), np.empty_like(x0, order="C")),
        (x0, np.empty_like(x0, order="F")),
    ):
        y = bnpy.BatchNorm(C, dtype=np.float64)(x, out=out)
        assert y is out
        np.testing.assert_allclose(y, want, **ROUNDING[np.float64])
    dy = np.asfortranarray(data((6, C, 5), 5, np.float64))
    y, m, invstd = bnpy.batch_norm_forward(x0, None, None, out=np.empty_like(x0, order="F"))
    dx, _, _ = bnpy.batch_norm_backward(dy, x0, None, m, invstd, out=np.empty_like(dy))
    assert dx.flags.f_contiguous
    bn = bnpy.BatchNorm(C, dtype=np.float64)
    bn(x0)
    with pytest.raises(ValueError, match="out must have the memory layout of the input"):
        bn.backward(dy, out=np.empty_like(dy))  # x saved C-contiguous, out Fortran
    assert bn.backward(dy).flags.c_contiguous  # dy read in x's layout


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_broadcast_inputs_bitwise(dtype, mode):
    """Zero strides: along the batch, the inner axis, the feature axis, all of it."""
    shape, axis = (4, C, 3), 1
    rng = np.random.default_rng(5)
    for base_shape in [(1, C, 3), (4, C, 1), (4, 1, 3), (1, C, 1), (C, 1), ()]:
        base = (rng.standard_normal(base_shape) * 2 + 1).astype(dtype)
        x = np.broadcast_to(base, shape)
        dy = np.broadcast_to((rng.standard_normal(base_shape)).astype(dtype), shape)
        assert 0 in x.strides
        want = run_layer(dtype, axis, mode, native_copy(x), native_copy(dy))
        assert run_layer(dtype, axis, mode, x, dy) == want, base_shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_x_saved_for_backward_survives_any_layout(dtype):
    """backward uses the last forward's x: when the binding made a copy of a
    non-contiguous x, changing the caller's array afterwards changes nothing
    (for a C-contiguous x the README asks the caller not to modify it)."""
    shape, axis = LAYOUTS["planar"]
    x0, dy = data(shape, 1, dtype), data(shape, 2, dtype)
    want = make_layer(dtype, axis)
    want(x0)
    expected = bits(want.backward(dy))
    for name in ("strided", "reversed", "misaligned-writable", "byteswapped"):
        x = variant(name, x0)
        bn = make_layer(dtype, axis)
        bn(x)
        x[...] = 0
        assert bits(bn.backward(dy)) == expected, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_setters_and_load_state_dict_take_any_layout(dtype):
    values = {
        "gamma": np.array([0.5, -1.5, 2.0, 1.25], dtype),
        "beta": np.array([0.25, 0.0, -1.0, 3.0], dtype),
        "running_mean": np.array([0.5, -0.5, 1.0, 2.0], dtype),
        "running_var": np.array([2.0, 0.5, 1.5, 3.0], dtype),
    }
    for name, v in values.items():
        for kind, w in vector_variants(v).items():
            bn = bnpy.BatchNorm(C, dtype=dtype)
            setattr(bn, name, w)
            want = np.broadcast_to(v[:1], v.shape) if kind == "broadcast-scalar" else v
            assert bits(getattr(bn, name)) == bits(np.array(want, dtype)), (name, kind)
    for kind in ("strided", "reversed", "misaligned", "byteswapped", "read-only"):
        sd = {k: vector_variants(v)[kind] for k, v in values.items()}
        sd["num_batches_tracked"] = 3
        bn = bnpy.BatchNorm(C, dtype=dtype)
        bn.load_state_dict(sd)
        for k, v in values.items():
            assert bits(getattr(bn, k)) == bits(v), (k, kind)


# --- the functional API -------------------------------------------------------------


def run_functional(x, dy, gamma, beta, mean, var, axis):
    y, m, invstd = bnpy.batch_norm_forward(x, gamma, beta, eps=1e-3, axis=axis)
    yi = bnpy.batch_norm_inference(x, gamma, beta, mean, var, eps=1e-3, axis=axis)
    out = {"y": bits(y), "mean": bits(m), "invstd": bits(invstd), "y_inference": bits(yi)}
    for training in (True, False):
        dx, dg, db = bnpy.batch_norm_backward(
            dy,
            x,
            gamma,
            m if training else mean,
            invstd if training else 1 / np.sqrt(var + 1e-3),
            axis=axis,
            training=training,
        )
        out[f"dx-{training}"], out[f"dg-{training}"], out[f"db-{training}"] = (
            bits(dx),
            bits(dg),
            bits(db),
        )
    return out


def _stats(dtype):
    return (
        np.array([0.5, -1.5, 2.0, 1.25], dtype),
        np.array([0.25, 0.0, -1.0, 3.0], dtype),
        np.array([0.5, -0.5, 1.0, 2.0], dtype),
        np.array([2.0, 0.5, 1.5, 3.0], dtype),
    )


@pytest.mark.parametrize("name", COPIED)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_any_layout_bitwise(dtype, layout, name):
    shape, axis = LAYOUTS[layout]
    x0, dy0 = data(shape, 1, dtype), data(shape, 2, dtype)
    gamma, beta, mean, var = _stats(dtype)
    want = run_functional(
        native_copy(variant(name, x0)),
        native_copy(variant(name, dy0)),
        gamma,
        beta,
        mean,
        var,
        axis,
    )
    x, dy = variant(name, x0), variant(name, dy0)
    x_bits = bits(x)
    assert run_functional(x, dy, gamma, beta, mean, var, axis) == want
    assert bits(x) == x_bits


@pytest.mark.parametrize(
    "kind",
    [
        "strided",
        "reversed",
        "misaligned",
        "byteswapped",
        "big-endian-f8",
        "read-only",
        "broadcast-scalar",
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_vector_arguments_any_layout(dtype, kind):
    shape, axis = LAYOUTS["planar"]
    x, dy = data(shape, 1, dtype), data(shape, 2, dtype)
    vectors = _stats(dtype)
    odd = [vector_variants(v)[kind] for v in vectors]
    plain = [native_copy(v) for v in odd]
    assert run_functional(x, dy, *odd, axis) == run_functional(x, dy, *plain, axis)


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_broadcast_inputs_bitwise(dtype):
    rng = np.random.default_rng(6)
    shape, axis = (4, C, 3), 1
    gamma, beta, mean, var = _stats(dtype)
    for base_shape in [(1, C, 3), (4, C, 1), (4, 1, 3), (C, 1)]:
        x = np.broadcast_to((rng.standard_normal(base_shape) * 2).astype(dtype), shape)
        dy = np.broadcast_to(rng.standard_normal(base_shape).astype(dtype), shape)
        want = run_functional(native_copy(x), native_copy(dy), gamma, beta, mean, var, axis)
        assert run_functional(x, dy, gamma, beta, mean, var, axis) == want, base_shape


# --- out= ---------------------------------------------------------------------------

SHAPE, AXIS = (6, C, 5), 1


def _other(dtype):
    return np.float64 if dtype is np.float32 else np.float32


def bad_outs(dtype):
    """name: (make(x, dy) -> out, exception). x, dy: C-contiguous arrays of the
    computation's dtype, made by the caller from one buffer when an overlap
    is wanted."""
    n = int(np.prod(SHAPE))

    def readonly(x, dy):
        out = np.zeros(SHAPE, dtype)
        out.flags.writeable = False
        return out

    def misaligned(x, dy):
        out = np.frombuffer(bytearray(n * np.dtype(dtype).itemsize + 1), dtype, n, 1)
        return out.reshape(SHAPE)

    return {
        "read-only": (readonly, ValueError),
        "wrong-shape": (lambda x, dy: np.zeros((7, C, 5), dtype), ValueError),
        "transposed-shape": (lambda x, dy: np.zeros(SHAPE[::-1], dtype), ValueError),
        "flat": (lambda x, dy: np.zeros(n, dtype), ValueError),
        "extra-dim": (lambda x, dy: np.zeros(SHAPE + (1,), dtype), ValueError),
        "wrong-dtype": (lambda x, dy: np.zeros(SHAPE, _other(dtype)), ValueError),
        "int-dtype": (lambda x, dy: np.zeros(SHAPE, np.int64), ValueError),
        "float16": (lambda x, dy: np.zeros(SHAPE, np.float16), ValueError),
        "byteswapped": (lambda x, dy: _byteswapped(np.zeros(SHAPE, dtype)), ValueError),
        "fortran": (lambda x, dy: np.zeros(SHAPE, dtype, order="F"), ValueError),
        "strided": (lambda x, dy: np.zeros((12, C, 5), dtype)[::2], ValueError),
        "misaligned": (misaligned, ValueError),
        "list": (lambda x, dy: np.zeros(SHAPE, dtype).tolist(), TypeError),
        "tuple-of-arrays": (lambda x, dy: (np.zeros(SHAPE, dtype),), TypeError),
        "overlaps-x": (lambda x, dy: _shifted(x, +1), ValueError),
        "overlaps-x-before": (lambda x, dy: _shifted(x, -7), ValueError),
        "overlaps-dy": (lambda x, dy: _shifted(dy, +3), ValueError),
    }


# x and dy live in one buffer with room around them, so that an out can
# overlap either of them in part
_PAD = 16


def _inputs_in_one_buffer(dtype):
    n = int(np.prod(SHAPE))
    buf = np.full(3 * n + 4 * _PAD, 99, dtype)
    x = buf[_PAD : _PAD + n].reshape(SHAPE)
    dy = buf[2 * _PAD + n : 2 * _PAD + 2 * n].reshape(SHAPE)
    x[...] = data(SHAPE, 1, dtype)
    dy[...] = data(SHAPE, 2, dtype)
    return buf, x, dy


def _shifted(a, elements):
    """A C-contiguous array of a's shape starting `elements` after a's start,
    in the same buffer."""
    base = a.base
    start = (
        a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    ) // a.itemsize + elements
    return base[start : start + a.size].reshape(a.shape)


OUT_FUNCTIONS = ["layer-forward", "layer-backward", "forward", "inference", "backward"]


def _call(function, bn, x, dy, out, dtype):
    gamma, beta, mean, var = _stats(dtype)
    if function == "layer-forward":
        return bn.forward(x, out=out)
    if function == "layer-backward":
        return bn.backward(dy, out=out)
    if function == "forward":
        return bnpy.batch_norm_forward(x, gamma, beta, axis=AXIS, out=out)
    if function == "inference":
        return bnpy.batch_norm_inference(x, gamma, beta, mean, var, axis=AXIS, out=out)
    _, m, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=AXIS)
    return bnpy.batch_norm_backward(dy, x, gamma, m, invstd, axis=AXIS, out=out)


def _layer_snapshot(bn, dy):
    snap = {k: bits(v) for k, v in bn.state_dict().items()}
    snap["grads"] = (bits(bn.grad_gamma), bits(bn.grad_beta))
    snap["backward"] = bits(bn.backward(dy))
    snap["grads_after"] = (bits(bn.grad_gamma), bits(bn.grad_beta))
    return snap


BAD_OUT_CASES = [
    (function, bad)
    for function in OUT_FUNCTIONS
    for bad in bad_outs(np.float32)
    if bad != "overlaps-dy" or function in ("layer-backward", "backward")
    if bad != "fortran" or function == "layer-backward"
]  # else x takes its layout


@pytest.mark.parametrize("function, bad", BAD_OUT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_out_raises_and_writes_nothing(dtype, function, bad):
    make, exc = bad_outs(dtype)[bad]
    buf, x, dy = _inputs_in_one_buffer(dtype)
    bn = make_layer(dtype, AXIS)
    bn(x)  # the layer's last forward: x itself (C-contiguous, the layer's dtype)
    bn.backward(dy)
    before = _layer_snapshot(bn, dy)
    out = make(x, dy)
    buf_before = bits(buf)
    out_before = None if isinstance(out, (list, tuple)) else bits(out)
    with pytest.raises(exc, match="out"):
        _call(function, bn, x, dy, out, dtype)
    assert bits(buf) == buf_before  # x, dy and any out inside buf: not written
    if out_before is not None:
        assert bits(out) == out_before
    assert _layer_snapshot(bn, dy) == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_backward_out_must_not_touch_the_saved_input(dtype):
    """backward still needs the last forward's x: out may not be it, nor
    overlap it, even though it is not among backward's own arguments."""
    buf, x, dy = _inputs_in_one_buffer(dtype)
    bn = make_layer(dtype, AXIS)
    bn(x)
    bn.backward(dy)
    before = _layer_snapshot(bn, dy)
    buf_before = bits(buf)
    for out in (x, x.view(), _shifted(x, 2)):
        with pytest.raises(ValueError, match="out"):
            bn.backward(dy, out=out)
        assert bits(buf) == buf_before
    assert _layer_snapshot(bn, dy) == before


@pytest.mark.parametrize(
    "function, target",
    [
        ("layer-forward", "x"),
        ("forward", "x"),
        ("inference", "x"),
        ("layer-backward", "dy"),
        ("backward", "dy"),
        ("backward", "x"),
    ],
)
@pytest.mark.parametrize("same_object", [True, False], ids=["same-object", "same-memory"])
@pytest.mark.parametrize(
    "shape",
    [(6, C, 5), (3, 7, 3000), (20000, 5)],
    ids=["small", "planar-tiles", "interleaved-groups"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_may_be_the_input_exactly(dtype, shape, same_object, function, target):
    """In place: out=x for the forwards, out=dy for the backwards (and out=x
    for the functional backward, which only reads x). The result is bitwise
    what a separate out gives; a view of the same memory counts as the same."""
    c = shape[1]
    x0, dy0 = data(shape, 1, dtype), data(shape, 2, dtype)
    want, want_bn = _run_any(function, dtype, x0, dy0, None, c)
    x, dy = x0.copy(), dy0.copy()
    arg = x if target == "x" else dy
    out = arg if same_object else arg.view()
    got, got_bn = _run_any(function, dtype, x, dy, out, c)
    first = got[0] if isinstance(got, tuple) else got
    assert first is out
    assert _result_bits(got) == _result_bits(want)
    if function == "layer-backward":
        assert (bits(got_bn.grad_gamma), bits(got_bn.grad_beta)) == (
            bits(want_bn.grad_gamma),
            bits(want_bn.grad_beta),
        )
    if function == "layer-forward":
        # the in-place forward kept the original x for backward
        assert bits(got_bn.backward(dy0)) == bits(want_bn.backward(dy0))
        for k, v in want_bn.state_dict().items():
            assert bits(got_bn.state_dict()[k]) == bits(v), k


def _params(c, dtype):
    rng = np.random.default_rng(c)
    return (
        rng.uniform(0.5, 2, c).astype(dtype),
        rng.uniform(-1, 1, c).astype(dtype),
        rng.uniform(-1, 1, c).astype(dtype),
        rng.uniform(0.5, 2, c).astype(dtype),
    )


def _run_any(function, dtype, x, dy, out, c):
    gamma, beta, mean, var = _params(c, dtype)
    bn = bnpy.BatchNorm(c, dtype=dtype, eps=1e-3)
    bn.gamma, bn.beta = gamma, beta
    if function == "layer-forward":
        return bn.forward(x, out=out), bn
    if function == "layer-backward":
        bn(x)
        return bn.backward(dy, out=out), bn
    if function == "forward":
        return bnpy.batch_norm_forward(x, gamma, beta, axis=1, out=out), bn
    if function == "inference":
        return bnpy.batch_norm_inference(x, gamma, beta, mean, var, axis=1, out=out), bn
    _, m, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=1)
    return bnpy.batch_norm_backward(dy, x, gamma, m, invstd, axis=1, out=out), bn


def _result_bits(result):
    if isinstance(result, tuple):
        return tuple(None if r is None else bits(r) for r in result)
    return bits(result)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_overlapping_a_copied_input_is_harmless(dtype):
    """x not contiguous: the binding works on a copy of it, so an out that
    overlaps x's original memory cannot corrupt the result."""
    n, c = 6, C
    buf = data((n, 2 * c), 1, dtype)
    x = buf[:, ::2]  # strided: copied by the binding
    x_values = x.copy()
    out = buf.reshape(-1)[: n * c].reshape(n, c)  # overlaps x's memory
    assert np.shares_memory(out, x)
    want_layer = bnpy.BatchNorm(c, dtype=dtype)(x_values)
    got = bnpy.BatchNorm(c, dtype=dtype).forward(x, out=out)
    assert got is out and bits(got) == bits(want_layer)
    buf[...] = data((n, 2 * c), 1, dtype)
    want = bnpy.batch_norm_forward(x_values, None, None)
    got = bnpy.batch_norm_forward(x, None, None, out=out)
    assert _result_bits(got) == _result_bits(want)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((6, C), id="interleaved"),
        pytest.param((6, C, 5), id="planar"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_aliasing_parameters_or_statistics(dtype, shape):
    """out sharing memory with gamma, beta, mean, var or invstd: the result must
    be what separate memory gives (or the call must refuse), never a result
    computed from parameters it has half overwritten."""
    x, dy = data(shape, 1, dtype), data(shape, 2, dtype)
    gamma, beta, mean, var = _stats(dtype)
    _, m, invstd = bnpy.batch_norm_forward(x, gamma, beta)
    cases = {
        "forward": (
            lambda g, b, s1, s2, out: bnpy.batch_norm_forward(x, g, b, out=out)[0],
            ("gamma", "beta"),
        ),
        "inference": (
            lambda g, b, s1, s2, out: bnpy.batch_norm_inference(x, g, b, s1, s2, out=out),
            ("gamma", "beta", "s1", "s2"),
        ),
        "backward": (
            lambda g, b, s1, s2, out: bnpy.batch_norm_backward(dy, x, g, s1, s2, out=out)[0],
            ("gamma", "s1", "s2"),
        ),
    }
    wrong = []
    for name, (call, aliasable) in cases.items():
        stats = (mean, var) if name == "inference" else (m, invstd)
        want = call(gamma, beta, *stats, None)
        for which in aliasable:
            out = np.zeros(shape, dtype)
            flat = out.reshape(-1)
            args = {"gamma": gamma, "beta": beta, "s1": stats[0], "s2": stats[1]}
            flat[2 * C : 3 * C] = args[which]  # the argument lives inside out
            args[which] = flat[2 * C : 3 * C]
            try:
                got = call(args["gamma"], args["beta"], args["s1"], args["s2"], out)
            except ValueError:
                continue
            if bits(got) != bits(want):
                wrong.append(f"{name}: out shares memory with {which}")
    assert not wrong
