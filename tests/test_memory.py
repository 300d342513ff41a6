"""Nothing leaks (issue 6), in the manner of NumPy's and bottleneck's memory tests.

- After a warm-up, 5,000 forward+backward iterations, and 1,000 calls that
  raise, grow tracemalloc's traced memory by less than 256 KiB. NumPy
  registers its data buffers with tracemalloc and the binding allocates with
  PyMem_*, so a leaked array, workspace or statistics buffer of even ~50 bytes
  per call shows.
- sys.getrefcount of inputs, outputs and parameters is unchanged after calls
  to every public entry point, including calls that raise; singletons that a
  leak would keep incrementing (the dtype objects, None, True, False, the
  BatchNorm type) stay put over many calls; and objects the layer lets go
  (old gradients, the previous forward's input, outputs) are really freed.
"""

import copy
import gc
import pickle
import sys
import tracemalloc
import weakref

import numpy as np

import bnpy

LIMIT = 256 * 1024
C = 8


def data(shape, seed, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5).astype(dtype)


def traced_growth(step, iterations, warmup=200):
    """Bytes of traced memory that `iterations` calls of step(i) leave behind."""
    gc.collect()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        for i in range(warmup):
            step(i)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(iterations):
            step(i)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        if not tracing:
            tracemalloc.stop()


def raises(call):
    try:
        call()
    except Exception:
        return True
    return False


# --- traced memory ------------------------------------------------------------------


def test_5000_layer_forward_backward_iterations():
    """Training and eval, two layouts, inputs needing conversion or not, with
    and without out=: every path through forward and backward."""
    layers = {
        "planar": bnpy.BatchNorm(C),
        "interleaved": bnpy.BatchNorm(C, dtype=np.float64, momentum=None),
    }
    shapes = {"planar": (4, C, 6), "interleaved": (16, C)}
    xs = {
        k: [data(s, 1), data(s, 2, np.float64), np.asfortranarray(data(s, 3))]
        for k, s in shapes.items()
    }
    dys = {k: data(s, 4) for k, s in shapes.items()}
    outs = {k: np.empty(s, np.dtype(layers[k].dtype)) for k, s in shapes.items()}

    def step(i):
        kind = "planar" if i % 2 else "interleaved"
        bn = layers[kind]
        bn.train(i % 5 != 0)
        x = xs[kind][i % 3]
        if i % 4 == 0:
            bn.forward(x, out=outs[kind])
            bn.backward(dys[kind], out=outs[kind])
        else:
            bn(x)
            bn.backward(dys[kind])

    growth = traced_growth(step, 5000)
    assert growth < LIMIT, f"traced memory grew by {growth} bytes"


def test_5000_functional_forward_backward_iterations():
    x, dy = data((16, C), 1), data((16, C), 2)
    x3 = data((4, C, 6), 3, np.float64)
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    mean, var = np.zeros(C), np.ones(C)

    def step(i):
        if i % 2:
            _y, m, invstd = bnpy.batch_norm_forward(x, gamma, beta)
            bnpy.batch_norm_backward(dy, x, gamma, m, invstd, training=bool(i % 3))
            bnpy.batch_norm_inference(x, gamma, beta, mean, var)
        else:
            _y, m, invstd = bnpy.batch_norm_forward(x3, None, None, axis=1)
            bnpy.batch_norm_backward(x3, x3, None, m, invstd, axis=1)

    growth = traced_growth(step, 5000)
    assert growth < LIMIT, f"traced memory grew by {growth} bytes"


def failing_calls():
    """name: a call that raises, from every entry point and from every stage of
    a call: before, during and after its allocations and kernels."""
    bn = bnpy.BatchNorm(C)
    bn(data((16, C), 1))
    bn.backward(data((16, C), 2))
    fresh = bnpy.BatchNorm(C)
    x, dy = data((16, C), 3), data((16, C), 4)
    x64 = x.astype(np.float64)
    nan_x = x.copy()
    nan_x[0, 3] = np.nan
    wide = data((16, C + 1), 5)
    single = np.ones((1, C), np.float32)
    complex_x = np.ones((16, C), complex)
    ragged = [[1.0, 2.0], [3.0]]
    bad_out = np.empty((16, C), np.float64)
    long_vector, short_vector = np.ones(C + 1), np.ones(C - 1)
    sd = bn.state_dict()
    bad_sd = {**sd, "running_var": np.array([1.0] * (C - 1) + [np.nan], np.float32)}
    late_bad_sd = {**sd, "num_batches_tracked": -1}
    mean, invstd = np.zeros(C), np.ones(C)
    buffer = np.concatenate([x.ravel(), np.zeros(1, x.dtype)])
    shifted_x = buffer[1:].reshape(x.shape)  # x's memory, one element on
    x = buffer[:-1].reshape(x.shape)
    gamma_in_out = np.ones_like(x).reshape(x.shape[0], -1)[:, : x[0].size].reshape(x.shape)
    bad_grads = {
        "training": True,
        "state_dict": sd,
        "grad_gamma": np.ones(C),
        "grad_beta": long_vector,
    }
    return {
        "constructor-num_features": lambda: bnpy.BatchNorm(0),
        "constructor-eps": lambda: bnpy.BatchNorm(C, eps=-1.0),
        "constructor-dtype": lambda: bnpy.BatchNorm(C, dtype="float16"),
        "constructor-momentum": lambda: bnpy.BatchNorm(C, momentum="x"),
        "forward-features": lambda: bn(wide),  # after converting x
        "forward-features-converted": lambda: bn(wide.astype(np.float64)),
        "forward-single-value": lambda: bn(single),  # after allocating, locked
        "forward-nonfinite": lambda: bn(nan_x),  # after the kernel ran
        "forward-nonfinite-out": lambda: bn.forward(nan_x, out=x.copy()),
        "forward-nonfinite-converted": lambda: bn(nan_x.astype(np.float64)),
        "forward-out": lambda: bn.forward(x, out=bad_out),  # out refused
        "forward-complex": lambda: bn(complex_x),
        "forward-ragged": lambda: bn(ragged),
        "backward-before-forward": lambda: fresh.backward(dy),
        "backward-dy-shape": lambda: bn.backward(wide),
        "backward-out": lambda: bn.backward(dy, out=bad_out),
        "backward-out-saved-x": lambda: bn.backward(dy, out=bn_saved_overlap(bn)),
        "set-gamma": lambda: setattr(bn, "gamma", long_vector),
        "set-running_var": lambda: setattr(bn, "running_var", "abc"),
        "set-eps": lambda: setattr(bn, "eps", 0.0),
        "set-momentum": lambda: setattr(bn, "momentum", 2.0),
        "set-training": lambda: setattr(bn, "training", "yes"),
        "train": lambda: bn.train("yes"),
        "load-nan": lambda: bn.load_state_dict(bad_sd),  # after converting earlier keys
        "load-count": lambda: bn.load_state_dict(late_bad_sd),  # after converting every vector
        "load-not-a-dict": lambda: bn.load_state_dict([]),
        "setstate-grad": lambda: bn.__setstate__(bad_grads),  # after reading the state dict
        "setstate-missing": lambda: bn.__setstate__({"training": True}),
        "functional-forward-gamma": lambda: bnpy.batch_norm_forward(x, long_vector, None),
        "functional-forward-out": lambda: bnpy.batch_norm_forward(x, None, mean, out=bad_out),
        "functional-forward-single": lambda: bnpy.batch_norm_forward(single, None, None),
        "functional-inference-var": lambda: bnpy.batch_norm_inference(
            x, None, None, mean, long_vector
        ),
        "functional-inference-out": lambda: bnpy.batch_norm_inference(
            x64, None, None, mean, invstd, out=bad_out[:1]
        ),
        "functional-backward-invstd": lambda: bnpy.batch_norm_backward(
            dy, x, None, mean, short_vector
        ),
        "functional-backward-out": lambda: bnpy.batch_norm_backward(
            dy, x, mean, mean, invstd, out=bad_out
        ),
        "functional-backward-overlap": lambda: bnpy.batch_norm_backward(
            dy, x, mean, mean, invstd, out=shifted_x
        ),  # out partly overlaps x
        "functional-forward-out-aliases-gamma": lambda: bnpy.batch_norm_forward(
            x, gamma_in_out[0, :C], None, out=gamma_in_out
        ),
        "functional-backward-dy": lambda: bnpy.batch_norm_backward(wide, x, None, mean, invstd),
        "functional-backward-training": lambda: bnpy.batch_norm_backward(
            dy, x, None, mean, invstd, training="no"
        ),
        "set_num_threads-zero": lambda: bnpy.set_num_threads(0),
        "set_num_threads-float": lambda: bnpy.set_num_threads(1.5),
    }


def bn_saved_overlap(bn):
    """A fresh C-contiguous x of the layer's dtype, made the layer's last
    forward input: an out that is this x overlaps what backward needs."""
    x = data((16, C), 9)
    bn(x)
    return x


def succeeding_calls():
    """name: a call that succeeds, for every public entry point."""
    bn = bnpy.BatchNorm(C)
    bn64 = bnpy.BatchNorm(C, dtype=np.float64, momentum=None, affine=False)
    x, dy = data((16, C), 1), data((16, C), 2)
    x64, x3 = x.astype(np.float64), data((4, C, 6), 3)
    out = np.empty((16, C), np.float32)
    gamma, mean, var = np.linspace(0.5, 2, C), np.zeros(C), np.ones(C)
    bn(x)
    bn.backward(dy)
    bn64(x)
    sd, state = bn.state_dict(), bn.__reduce__()[2]
    return {
        "constructor": lambda: bnpy.BatchNorm(C, eps=1e-3, momentum=None, dtype="float64"),
        "forward": lambda: bn(x),
        "forward-converted": lambda: bn(x64),
        "forward-planar": lambda: bn(x3),
        "forward-out": lambda: bn.forward(x, out=out),
        "forward-in-place": lambda: bn.forward(x.copy(), out=None),
        "forward-eval": lambda: (bn.eval(), bn(x), bn.train()),
        "forward-backward": lambda: (bn(x), bn.backward(dy)),
        "forward-backward-out": lambda: (bn(x), bn.backward(dy, out=out)),
        "forward-backward-f64-no-affine": lambda: (bn64(x), bn64.backward(dy)),
        "getters": lambda: (
            bn.gamma,
            bn.beta,
            bn.running_mean,
            bn.running_var,
            bn.grad_gamma,
            bn.grad_beta,
            bn.num_batches_tracked,
            bn.dtype,
            bn.eps,
            bn.momentum,
            bn.training,
            bn.axis,
        ),
        "setters": lambda: (
            setattr(bn, "gamma", gamma),
            setattr(bn, "running_var", var),
            setattr(bn, "eps", 1e-5),
            setattr(bn, "momentum", 0.1),
            setattr(bn, "training", True),
        ),
        "state_dict": lambda: bn.state_dict(),
        "load_state_dict": lambda: bn.load_state_dict(sd),
        "reduce": lambda: bn.__reduce__(),
        "setstate": lambda: bn.__setstate__(state),
        "pickle": lambda: pickle.loads(pickle.dumps(bn)),
        "deepcopy": lambda: copy.deepcopy(bn),
        "repr": lambda: repr(bn),
        "batch_norm_forward": lambda: bnpy.batch_norm_forward(x, gamma, gamma),
        "batch_norm_forward-planar": lambda: bnpy.batch_norm_forward(x3, None, None),
        "batch_norm_inference": lambda: bnpy.batch_norm_inference(x, gamma, None, mean, var),
        "batch_norm_backward": lambda: bnpy.batch_norm_backward(dy, x, gamma, mean, var),
        "batch_norm_backward-eval": lambda: bnpy.batch_norm_backward(
            dy, x, None, mean, var, training=False
        ),
        "threads": lambda: (bnpy.set_num_threads(bnpy.get_num_threads()), bnpy.has_openmp()),
    }


def test_1000_raising_calls():
    calls = list(failing_calls().values())
    assert all(raises(call) for call in calls)
    threads = bnpy.get_num_threads()

    def step(i):
        assert raises(calls[i % len(calls)])

    try:
        growth = traced_growth(step, 1000, warmup=2 * len(calls))
    finally:
        bnpy.set_num_threads(threads)
    assert growth < LIMIT, f"traced memory grew by {growth} bytes"


# Finer than the 256 KiB per 1000 calls: each path on its own, so that
# a leak of a small buffer (a workspace of a few hundred bytes) on one rare
# path cannot hide among the others. Noise after warm-up is a few KiB.
PER_PATH_CALLS, PER_PATH_LIMIT = 300, 32 * 1024


def growth_per_path(calls):
    """{name: bytes of traced memory PER_PATH_CALLS calls left behind}, in one
    tracemalloc session (starting one per path costs more than the calls)."""
    threads = bnpy.get_num_threads()
    gc.collect()
    gc.freeze()  # what exists now is not scanned again: full collections get cheap
    tracemalloc.start()
    try:
        growth = {}
        for name, call in calls.items():
            for _ in range(100):  # warm-up: first calls fill caches (copy, pickle, NumPy)
                call()
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(PER_PATH_CALLS):
                call()
            gc.collect()  # a full collection: copy.deepcopy leaves cycles behind
            growth[name] = tracemalloc.get_traced_memory()[0] - before
        return growth
    finally:
        tracemalloc.stop()
        gc.unfreeze()
        bnpy.set_num_threads(threads)


def test_no_raising_path_leaks():
    calls = {name: (lambda call=call: raises(call)) for name, call in failing_calls().items()}
    growth = growth_per_path(calls)
    leaky = {name: g for name, g in growth.items() if g >= PER_PATH_LIMIT}
    assert not leaky, f"traced memory grew (bytes per {PER_PATH_CALLS} calls): {leaky}"


def test_no_entry_point_leaks():
    growth = growth_per_path(succeeding_calls())
    leaky = {name: g for name, g in growth.items() if g >= PER_PATH_LIMIT}
    assert not leaky, f"traced memory grew (bytes per {PER_PATH_CALLS} calls): {leaky}"


def test_layers_made_and_dropped():
    """Construction, pickling, copying and destruction of whole layers."""
    x, dy = data((6, C), 1), data((6, C), 2)

    def step(i):
        bn = bnpy.BatchNorm(
            C,
            dtype=np.float64 if i % 2 else np.float32,
            affine=bool(i % 3),
            track_running_stats=bool(i % 5),
        )
        bn(x)
        bn.backward(dy)
        clone = pickle.loads(pickle.dumps(bn)) if i % 2 else copy.deepcopy(bn)
        clone.load_state_dict(bn.state_dict())
        repr(clone)

    growth = traced_growth(step, 1000, warmup=100)
    assert growth < LIMIT, f"traced memory grew by {growth} bytes"


# --- reference counts ---------------------------------------------------------------------


def counts(*objects):
    return [sys.getrefcount(o) for o in objects]


def _internal(bn):
    """The layer's own parameter and statistic arrays (the bases of its views)."""
    arrays = []
    for name in ("gamma", "beta", "running_mean", "running_var"):
        view = getattr(bn, name)
        if view is not None:
            arrays.append(view.base)
    return arrays


def test_refcounts_layer_calls():
    bn = bnpy.BatchNorm(C)
    x = data((16, C), 1)  # C-contiguous float32: the layer keeps it for backward
    x64 = data((16, C), 2, np.float64)  # converted: the layer keeps its own copy
    dy = data((16, C), 3)
    out = np.empty((16, C), np.float32)
    gamma_in = np.linspace(0.5, 2, C)
    params = _internal(bn)
    watched = [bn, x, x64, dy, out, gamma_in, *params]
    base = counts(*watched)

    bn(x64)
    bn.backward(dy)
    bn.forward(x64, out=out)
    bn.backward(dy, out=out)
    bn.gamma = gamma_in
    bn.beta = gamma_in
    bn.running_mean = gamma_in
    bn.running_var = gamma_in
    bn.eps = 1e-3
    bn.momentum = None
    bn.training = True
    bn.train(False)
    bn.eval()
    bn.train()
    bn.state_dict()
    bn.load_state_dict(bn.state_dict())
    bn.__setstate__(bn.__reduce__()[2])
    pickle.loads(pickle.dumps(bn))
    copy.deepcopy(bn)
    repr(bn)
    for name in (
        "gamma",
        "beta",
        "running_mean",
        "running_var",
        "grad_gamma",
        "grad_beta",
        "num_batches_tracked",
        "num_features",
        "affine",
        "track_running_stats",
        "axis",
        "dtype",
        "eps",
        "momentum",
        "training",
    ):
        getattr(bn, name)
    after = counts(*watched)
    assert after == base

    # x itself is kept (not copied) for backward, and let go by the next forward
    x_base = sys.getrefcount(x)
    bn(x)
    kept = sys.getrefcount(x)
    bn(x)
    bn.backward(dy)
    still_kept = sys.getrefcount(x)
    bn(x64)
    released = sys.getrefcount(x)
    assert (kept, still_kept, released) == (x_base + 1, x_base + 1, x_base)
    after = counts(*watched)
    assert after == base


def test_refcounts_unchanged_by_raising_calls():
    bn = bnpy.BatchNorm(C)
    x = data((16, C), 1)
    bn(data((16, C), 9, np.float64))  # the saved input is the layer's own copy
    dy = data((16, C), 3)
    nan_x = x.copy()
    nan_x[2, 2] = np.nan
    bad_out = np.empty((16, C), np.float64)
    good_out = np.empty((16, C), np.float32)
    wrong = np.ones(C + 1)
    sd = bn.state_dict()
    params = _internal(bn)
    mean, invstd = np.zeros(C), np.ones(C)
    watched = [bn, x, nan_x, dy, bad_out, good_out, wrong, mean, invstd, *sd.values(), *params]
    base = counts(*watched)
    calls = [
        lambda: bn(nan_x),
        lambda: bn.forward(nan_x, out=good_out),
        lambda: bn.forward(x, out=bad_out),
        lambda: bn(x[:1]),
        lambda: bn(np.ones((16, C + 1), np.float32)),
        lambda: bn.backward(wrong),
        lambda: bn.backward(dy, out=bad_out),
        lambda: setattr(bn, "gamma", wrong),
        lambda: bn.load_state_dict({**sd, "gamma": wrong}),
        lambda: bn.load_state_dict({**sd, "running_var": -sd["running_var"]}),
        lambda: bn.__setstate__({"training": True, "state_dict": sd, "grad_gamma": wrong}),
        lambda: bnpy.batch_norm_forward(x, wrong, None),
        lambda: bnpy.batch_norm_forward(x, None, None, out=bad_out),
        lambda: bnpy.batch_norm_inference(x, None, None, mean, wrong),
        lambda: bnpy.batch_norm_inference(x, None, None, mean, invstd, out=bad_out),
        lambda: bnpy.batch_norm_backward(dy, x, None, mean, wrong),
        lambda: bnpy.batch_norm_backward(dy, x, wrong, mean, invstd),
        lambda: bnpy.batch_norm_backward(dy, x, None, mean, invstd, out=bad_out),
        lambda: bnpy.batch_norm_backward(wrong, x, None, mean, invstd),
    ]
    for call in calls:
        assert raises(call)
    after = counts(*watched)
    assert after == base


def test_refcounts_functional_calls():
    x, dy = data((16, C), 1), data((16, C), 2)
    x3 = data((4, C, 5), 3, np.float64)
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    mean, var = np.zeros(C, np.float32), np.ones(C, np.float32)
    out = np.empty((16, C), np.float32)
    watched = [x, dy, x3, gamma, beta, mean, var, out]
    base = counts(*watched)
    y, m, invstd = bnpy.batch_norm_forward(x, gamma, beta)
    bnpy.batch_norm_forward(x, gamma, beta, out=out)
    bnpy.batch_norm_forward(x, None, None, out=x.copy())
    bnpy.batch_norm_inference(x, gamma, beta, mean, var)
    bnpy.batch_norm_inference(x, gamma, beta, mean, var, out=out)
    bnpy.batch_norm_backward(dy, x, gamma, m, invstd)
    bnpy.batch_norm_backward(dy, x, None, mean, var, training=False, out=out)
    bnpy.batch_norm_forward(x3, None, None)
    after = counts(*watched)
    assert after == base
    # results hold no hidden references: our variable (and getrefcount's
    # argument) are the only ones
    held = [sys.getrefcount(y), sys.getrefcount(m), sys.getrefcount(invstd)]
    assert held == [2, 2, 2]


def test_results_are_freed():
    """Outputs, gradients, state dicts and the previous forward's input are
    freed once nobody uses them: the layer holds on to nothing extra."""
    bn = bnpy.BatchNorm(C)
    x, dy = data((16, C), 1), data((16, C), 2)
    y = bn(x)
    dx = bn.backward(dy)
    refs = [weakref.ref(a) for a in (y, dx, bn.grad_gamma.base, bn.grad_beta.base)]
    sd = bn.state_dict()
    refs += [weakref.ref(v) for v in sd.values() if isinstance(v, np.ndarray)]
    r = bnpy.batch_norm_forward(x, None, None)
    refs += [weakref.ref(a) for a in r]
    r2 = bnpy.batch_norm_backward(dy, x, np.ones(C), r[1], r[2])
    refs += [weakref.ref(a) for a in r2]
    refs.append(weakref.ref(x))
    del y, dx, sd, r, r2, x
    bn(data((16, C), 5))  # lets go of x
    bn.backward(dy)  # replaces the gradients
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * len(refs)


def test_layer_is_freed_with_everything_it_holds():
    bn = bnpy.BatchNorm(C)
    x = data((16, C), 1)
    bn(x)
    bn.backward(data((16, C), 2))
    refs = [weakref.ref(a) for a in _internal(bn)] + [weakref.ref(bn.grad_gamma.base)]
    layer_type = bnpy.BatchNorm
    type_count = sys.getrefcount(layer_type)
    x_count = sys.getrefcount(x)
    del bn
    gc.collect()
    type_after, x_after = sys.getrefcount(layer_type), sys.getrefcount(x)
    assert all(ref() is None for ref in refs)
    assert x_after == x_count - 1  # the saved input was released
    assert type_after == type_count - 1  # an instance's reference to its heap type


def test_layer_in_a_reference_cycle_is_collected():
    """The full GC protocol: a layer reachable only from a cycle through its
    own instance state is collected (a subclass can hold attributes)."""

    class Holder(bnpy.BatchNorm):
        pass

    bn = Holder(C)
    bn.me = bn
    bn(data((16, C), 1))
    ref = weakref.ref(bn)
    del bn
    gc.collect()
    assert ref() is None


SINGLETONS = {
    "float32 dtype": np.dtype(np.float32),
    "float64 dtype": np.dtype(np.float64),
    "None": None,
    "True": True,
    "False": False,
    "BatchNorm type": bnpy.BatchNorm,
}


def test_singletons_do_not_gain_references():
    """A missing DECREF on a dtype, None or a bool shows as a count that grows
    with every call; immortal objects (Python >= 3.12) cannot show it. The
    loop creates no arrays itself: NumPy's own np.zeros(n) (default dtype)
    adds a reference to the float64 dtype per call, which would hide ours."""
    bn = bnpy.BatchNorm(C, affine=True)
    bn64 = bnpy.BatchNorm(C, dtype=np.float64, affine=False, track_running_stats=False)
    x, dy = data((16, C), 1), data((16, C), 2)
    x64, zeros, ones = x.astype(np.float64), np.zeros(C), np.ones(C)
    wrong, wrong_dy = np.ones(C + 1), np.ones((16, C + 1))
    nan_x = x.copy()
    nan_x[0, 0] = np.nan
    sd = bn.state_dict()
    bad_sd = {**sd, "running_var": -sd["running_var"]}
    failing = [
        lambda: bn(nan_x),
        lambda: bn(wrong_dy),
        lambda: bn.backward(wrong_dy),
        lambda: bn.backward(wrong),
        lambda: bn.forward(x, out=x64),
        lambda: setattr(bn, "gamma", wrong),
        lambda: setattr(bn, "eps", -1.0),
        lambda: bn.load_state_dict(bad_sd),
        lambda: bn.train(None),
        lambda: bn.__setstate__({"training": True, "state_dict": sd, "grad_gamma": wrong}),
        lambda: bnpy.BatchNorm(C, dtype="float16"),
        lambda: bnpy.BatchNorm(C, dtype=None),
        lambda: bnpy.batch_norm_forward(x, wrong, None),
        lambda: bnpy.batch_norm_inference(x64, None, None, zeros, wrong),
        lambda: bnpy.batch_norm_backward(dy, x, None, zeros, wrong),
        lambda: bnpy.batch_norm_backward(dy, x, ones, zeros, ones, training=None),
        lambda: bnpy.set_num_threads(None),
    ]

    def round_of_calls():
        for layer in (bn, bn64):
            layer(x)
            layer(x64)
            layer.backward(dy)
            layer.backward(x64)
            layer.state_dict()
            _ = layer.momentum, layer.grad_gamma, layer.gamma, layer.dtype, layer.training
            layer.__reduce__()
            repr(layer)
        bn.gamma = ones
        bn.load_state_dict(sd)
        _y, mean, invstd = bnpy.batch_norm_forward(x, None, None)
        bnpy.batch_norm_backward(dy, x, None, mean, invstd)
        bnpy.batch_norm_backward(dy, x, ones, zeros, ones, training=False)
        bnpy.batch_norm_inference(x64, None, None, zeros, ones)
        bnpy.batch_norm_inference(x, ones, None, zeros, ones)
        bnpy.BatchNorm(C, dtype="float64", momentum=None)
        bnpy.BatchNorm(C, dtype=np.float32)
        bnpy.has_openmp()
        for call in failing:
            raises(call)

    threads = bnpy.get_num_threads()
    try:
        round_of_calls()
        before = {k: sys.getrefcount(v) for k, v in SINGLETONS.items()}
        n = 200
        for _ in range(n):
            round_of_calls()
        after = {k: sys.getrefcount(v) for k, v in SINGLETONS.items()}
    finally:
        bnpy.set_num_threads(threads)
    grew = {
        k: after[k] - before[k]
        for k in SINGLETONS
        if before[k] < 2**29 and after[k] - before[k] >= n // 2
    }
    assert not grew, f"reference counts grew by (per {n} rounds): {grew}"


def test_thread_functions_refcounts():
    n = 3
    base = sys.getrefcount(n)
    before = bnpy.get_num_threads()
    for _ in range(100):
        bnpy.set_num_threads(n)
        bnpy.get_num_threads()
        bnpy.has_openmp()
        raises(lambda: bnpy.set_num_threads(-n))
    bnpy.set_num_threads(before)
    after = sys.getrefcount(n)
    assert after == base or base > 2**29
