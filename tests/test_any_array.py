"""Any array in (issue 26, item 1).

Every entry point takes what NumPy views without a copy (buffer protocol,
__array_interface__, __array__) and any CPU object with __dlpack__, without
copying it; a DLPack object on another device, a torch tensor that requires
grad and a masked array raise TypeError saying what to do; outputs are
ndarrays.

Zero copy is observed through in-place inference: `bn(x, out=view_of_x)` in
eval mode overwrites its input, after which backward has nothing to
differentiate and says so. Had bnpy copied x, the copy would be saved and
backward would run.
"""

import numpy as np
import pytest

import bnpy

C = 3


def data(shape=(8, C), seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


class DLPackOnly:
    """An object that speaks DLPack and nothing else NumPy understands."""

    def __init__(self, array, device=(1, 0)):
        self._array = array
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device


class InterfaceOnly:
    """An object with only __array_interface__."""

    def __init__(self, array):
        self._array = array
        self.__array_interface__ = array.__array_interface__


def wraps(kind, a):
    """a seen through one protocol, and an ndarray sharing its memory."""
    if kind == "dlpack":
        return DLPackOnly(a), a
    if kind == "array_interface":
        return InterfaceOnly(a), a
    if kind == "buffer":
        view = memoryview(a)
        return view, np.asarray(view)
    raise AssertionError(kind)


KINDS = ["dlpack", "array_interface", "buffer"]


@pytest.mark.parametrize("kind", KINDS)
def test_layer_reads_input_without_copy(kind):
    a = data()
    expected = bnpy.BatchNorm(C).eval()(a.copy())
    bn = bnpy.BatchNorm(C).eval()
    x, same_memory = wraps(kind, a)
    y = bn(x, out=same_memory)
    assert type(y) is np.ndarray and np.shares_memory(y, a)
    np.testing.assert_array_equal(a, expected)
    with pytest.raises(RuntimeError, match="wrote its output over its input"):
        bn.backward(np.ones_like(a))


@pytest.mark.parametrize("kind", KINDS)
def test_every_argument_of_every_entry_point(kind):
    """Every array argument through the protocol gives the ndarray's bits."""
    x, dy = data(seed=1, dtype=np.float64), data(seed=2, dtype=np.float64)
    gamma, beta = data((C,), 3, np.float64), data((C,), 4, np.float64)

    def w(a):
        return wraps(kind, a.copy())[0]

    ref = bnpy.batch_norm_forward(x, gamma, beta)
    got = bnpy.batch_norm_forward(w(x), w(gamma), w(beta))
    for r, g in zip(ref, got):
        assert type(g) is np.ndarray
        np.testing.assert_array_equal(g, r)
    _, mean, invstd = ref
    ref = bnpy.batch_norm_backward(dy, x, gamma, mean, invstd)
    got = bnpy.batch_norm_backward(w(dy), w(x), w(gamma), w(mean), w(invstd))
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(g, r)
    var = 1 / invstd**2
    np.testing.assert_array_equal(
        bnpy.batch_norm_inference(w(x), w(gamma), w(beta), w(mean), w(var)),
        bnpy.batch_norm_inference(x, gamma, beta, mean, var),
    )

    ref_bn, bn = bnpy.BatchNorm(C, dtype=np.float64), bnpy.BatchNorm(C, dtype=np.float64)
    ref_bn.gamma, ref_bn.beta = gamma, beta
    bn.gamma, bn.beta = w(gamma), w(beta)
    bn.running_mean, bn.running_var = w(mean), w(var)
    ref_bn.running_mean, ref_bn.running_var = mean, var
    np.testing.assert_array_equal(bn(w(x)), ref_bn(x))
    np.testing.assert_array_equal(bn.backward(w(dy)), ref_bn.backward(dy))
    bn.calibrate([w(x), w(dy)])
    ref_bn.calibrate([x, dy])
    np.testing.assert_array_equal(bn.running_var, ref_bn.running_var)
    bn.load_state_dict(
        {
            k: w(np.asarray(v)) if k != "num_batches_tracked" else v
            for k, v in ref_bn.state_dict().items()
        }
    )
    np.testing.assert_array_equal(bn.running_mean, ref_bn.running_mean)


def test_dlpack_only_object_was_refused_before():
    """The object of the issue: DLPack alone; the old message named dtype('O')."""
    y = bnpy.BatchNorm(C)(DLPackOnly(data()))
    assert y.shape == (8, C) and y.dtype == np.float32


def test_dlpack_on_another_device_raises_and_says_what_to_do():
    bn = bnpy.BatchNorm(C)
    with pytest.raises(TypeError, match=r"x lives on DLPack device \(2, 0\), not the CPU.*cpu\(\)"):
        bn(DLPackOnly(data(), device=(2, 0)))
    with pytest.raises(TypeError, match="gamma lives on DLPack device"):
        bnpy.batch_norm_forward(data(), DLPackOnly(np.ones(C), device=(2, 0)), None)
    assert bn.num_batches_tracked == 0
    with pytest.raises(RuntimeError, match="before any forward"):
        bn.backward(data())


@pytest.mark.parametrize("where", ["x", "gamma", "dy", "batch"])
def test_masked_array_raises_naming_the_mask(where):
    a = data()
    masked = np.ma.masked_array(a, mask=a > 1)
    bn = bnpy.BatchNorm(C)
    before = bn.state_dict()
    with pytest.raises(TypeError, match=rf"{where} is a numpy.ma.MaskedArray.*mask"):
        if where == "x":
            bn(masked)
        elif where == "gamma":
            bnpy.batch_norm_forward(a, np.ma.masked_array(np.ones(C)), None)
        elif where == "dy":
            bn(a)
            before = bn.state_dict()
            bn.backward(masked)
        else:
            bn.calibrate([a, masked])
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_torch_tensors_zero_copy(torch):
    t = torch.from_numpy(data())
    bn = bnpy.BatchNorm(C).eval()
    y = bn(t, out=t.numpy())
    assert type(y) is np.ndarray and np.shares_memory(y, t.numpy())
    with pytest.raises(RuntimeError, match="wrote its output over its input"):
        bn.backward(np.ones((8, C), np.float32))


def test_torch_tensor_that_requires_grad_raises(torch):
    t = torch.ones(8, C, requires_grad=True)
    with pytest.raises(TypeError, match=r"x is a tensor that requires grad: pass x.detach\(\)"):
        bnpy.BatchNorm(C)(t)
    y = bnpy.BatchNorm(C)(t.detach())
    assert type(y) is np.ndarray


class DLPackThatFails(DLPackOnly):
    """As NumPy finds a bfloat16 tensor: np.from_dlpack raises; maybe an
    __array__ that works (JAX's gives ml_dtypes.bfloat16)"""

    def __init__(self, array, dtype="bfloat16", with_array=True):
        super().__init__(array)
        self.dtype = dtype
        if with_array:
            self.__array__ = lambda dtype=None, copy=None: array

    def __dlpack__(self, **kwargs):
        raise RuntimeError("Unsupported dtype in DLTensor.")


def test_dlpack_that_numpy_cannot_take_falls_back_to_array():
    x = data()
    assert np.array_equal(bnpy.BatchNorm(C)(DLPackThatFails(x)), bnpy.BatchNorm(C)(x))


@pytest.mark.parametrize("dtype", ["bfloat16", "complex32"])
def test_dlpack_that_numpy_cannot_take_raises_naming_why(dtype):
    bn = bnpy.BatchNorm(C)
    with pytest.raises(TypeError, match=r"np.from_dlpack\(x\) raised RuntimeError") as error:
        bn(DLPackThatFails(data(), dtype, with_array=False))
    assert ("ml_dtypes.bfloat16" in str(error.value)) == (dtype == "bfloat16")
    assert bn.num_batches_tracked == 0


def test_torch_bfloat16_tensor_raises_saying_what_to_pass(torch):
    t = torch.randn(8, C).bfloat16()
    with pytest.raises(TypeError, match=r"t\.view\(torch\.int16\)\.numpy\(\)"):
        bnpy.BatchNorm(C)(t)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # the way the message gives
    assert bnpy.BatchNorm(C)(x).dtype == x.dtype


class CountingDLPack(DLPackOnly):
    """DLPackOnly that counts the times NumPy asks it for its data"""

    def __init__(self, array):
        super().__init__(array)
        self.asked = 0

    def __dlpack__(self, **kwargs):
        self.asked += 1
        return super().__dlpack__(**kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_a_dlpack_input_is_converted_once_per_call(dtype):
    """x through DLPack (a torch tensor's way in) is taken once, not once to
    learn its dtype and again for its data"""
    layer_dtype = np.float64 if dtype == np.float64 else np.float32
    x = CountingDLPack(data(dtype=dtype))
    bn = bnpy.BatchNorm(C, dtype=layer_dtype)
    y = bn(x)
    assert x.asked == 1 and y.dtype == dtype
    bnpy.batch_norm_forward(x, None, None)
    bnpy.batch_norm_inference(x, None, None, np.zeros(C), np.ones(C))
    assert x.asked == 3
    bnpy.batch_norm_backward(x, data(dtype=dtype), None, np.zeros(C), np.ones(C))  # as dy
    bnpy.batch_norm_backward(data(dtype=dtype), x, None, np.zeros(C), np.ones(C))  # as x
    assert x.asked == 5
