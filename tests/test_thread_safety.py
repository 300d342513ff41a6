"""Python threads sharing one layer (issue 6).

Each layer serializes its own forward, backward and state changes with a
per-object lock, while the kernels run without the GIL. So, from many
threads at once:
- 8 threads x 200 eval-mode forwards on one layer equal a serial run bitwise;
- 4 threads x 100 training forwards leave num_batches_tracked == 400 and
  running statistics that are finite and exactly what 400 serial updates give;
- backward, setters, load_state_dict, state_dict, pickling and
  set_num_threads mixed in from other threads never tear a result: every output
  is bitwise one of the outputs a serial run with one of the states gives;
- nothing crashes or deadlocks, not even when converting an argument calls
  back into the same layer; and the kernels really let other threads run.
(tests/test_threads.py is about the OpenMP threads inside one call.)
"""

import pickle
import sys
import threading
import time

import numpy as np
import pytest
from bitwise import bits

import bnpy

JOIN_TIMEOUT = 120  # seconds: a deadlock fails the test instead of hanging the suite

# planar with many features (each kernel call spans many features, and is
# large enough for the OpenMP team) and interleaved
LAYOUTS = {
    "planar": ((8, 64, 130), 1),
    "interleaved": ((1000, 60), 1),  # below the size that starts OpenMP threads
}


@pytest.fixture(autouse=True)
def fast_switching():
    """Threads take turns every 0.1 ms instead of every 5 ms: more
    interleavings to catch a race, and busy threads do not starve the rest."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(before)


def data(shape, seed, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5).astype(dtype)


def run_threads(workers):
    """Start every worker(start_barrier) at once; return the exceptions raised."""
    errors = []
    barrier = threading.Barrier(len(workers))

    def wrap(work):
        def target():
            try:
                barrier.wait()
                work()
            except BaseException as error:
                errors.append(error)

        return target

    threads = [threading.Thread(target=wrap(w), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "threads still running: deadlock?"
    return errors


def trained_layer(shape, axis, dtype=np.float32, **kw):
    c = shape[axis]
    bn = bnpy.BatchNorm(c, axis=axis, dtype=dtype, **kw)
    rng = np.random.default_rng(1)
    bn.gamma = rng.uniform(0.5, 2.0, c)
    bn.beta = rng.uniform(-1.0, 1.0, c)
    for seed in range(3):
        bn(data(shape, seed))
    return bn


def state_bits(bn):
    return {k: bits(v) for k, v in bn.state_dict().items()}


# --- the two scenarios -----------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_forwards_in_8_threads_equal_a_serial_run(layout):
    shape, axis = LAYOUTS[layout]
    bn = trained_layer(shape, axis).eval()
    inputs = [data(shape, 10 + k) for k in range(5)]
    serial = [bits(bn(x)) for x in inputs]
    before = state_bits(bn)
    mismatches = []

    def worker(t):
        def work():
            for i in range(200):
                k = (t + i) % len(inputs)
                if bits(bn(inputs[k])) != serial[k]:
                    mismatches.append((t, i))

        return work

    errors = run_threads([worker(t) for t in range(8)])
    assert not errors
    assert not mismatches
    assert state_bits(bn) == before
    assert [bits(bn(x)) for x in inputs] == serial


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_forwards_in_4_threads_count_every_batch(layout):
    shape, axis = LAYOUTS[layout]
    x = data(shape, 20)
    serial = trained_layer(shape, axis)
    y_serial = bits(serial(x))
    for _ in range(399):
        serial(x)
    shared = trained_layer(shape, axis)
    start_count = shared.num_batches_tracked
    wrong = []

    def work():
        for _ in range(100):
            if bits(shared(x)) != y_serial:
                wrong.append(1)  # noqa: PERF401 - counted as they happen, in threads

    errors = run_threads([work] * 4)
    assert not errors and not wrong
    assert shared.num_batches_tracked - start_count == 400
    assert np.isfinite(shared.running_mean).all() and np.isfinite(shared.running_var).all()
    # the same update 400 times, in whatever order the threads took turns:
    # exactly what the serial run computed (a lost or torn update would show)
    assert state_bits(shared) == state_bits(serial)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_training_forwards_of_different_batches_average_correctly(dtype):
    """momentum=None keeps the cumulative average: with distinct batches from
    4 threads, whatever the order, it ends at the mean of the 400 batch means."""
    shape, axis = (16, 8, 10), 1
    c = shape[axis]
    bn = bnpy.BatchNorm(c, axis=axis, dtype=dtype, momentum=None)
    batches = [[data(shape, 100 * t + i, dtype) for i in range(100)] for t in range(4)]

    def worker(t):
        def work():
            for x in batches[t]:
                bn(x)

        return work

    errors = run_threads([worker(t) for t in range(4)])
    assert not errors
    assert bn.num_batches_tracked == 400
    means = [x.astype(np.float64).mean(axis=(0, 2)) for xs in batches for x in xs]
    tol = 1e-5 if dtype is np.float32 else 1e-12
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=tol, atol=tol)
    assert np.isfinite(bn.running_var).all()


# --- mixed in: backward, setters, state ---------------------------------------------------


def test_backward_setters_and_state_from_other_threads():
    """Training forwards of one x in two threads; backward in two more; a
    thread switching gamma between A and B (by assignment and by
    load_state_dict) and setting running_var; one reading state_dict, views,
    repr and pickles; one setting momentum and the mode (to training, as it
    is). Every y and dx must be bitwise the serial result for gamma A or for
    gamma B: a forward or backward that saw half of A and half of B would
    match neither. (Without the layer's lock this fails at once.)"""
    shape, axis = LAYOUTS["planar"]
    c = shape[axis]
    x, dy = data(shape, 30), data(shape, 31)
    gamma_a = np.linspace(0.5, 2.0, c)
    gamma_b = np.linspace(-2.0, -0.5, c)
    beta = np.linspace(-1, 1, c)
    expected_y, expected_dx = set(), set()
    for g in (gamma_a, gamma_b):
        ref = trained_layer(shape, axis)
        ref.gamma, ref.beta = g, beta
        expected_y.add(bits(ref(x)))
        expected_dx.add(bits(ref.backward(dy)))
    grads_serial = (bits(ref.grad_gamma), bits(ref.grad_beta))  # do not depend on gamma

    bn = trained_layer(shape, axis)
    bn.gamma, bn.beta = gamma_a, beta
    bn(x)
    stop = threading.Event()
    bad = []

    def forwards():
        for _ in range(150):
            y = bn(x)
            if bits(y) not in expected_y:
                bad.append("y")

    def backwards():
        for _ in range(150):
            dx = bn.backward(dy)
            if bits(dx) not in expected_dx:
                bad.append("dx")

    def setter():
        sd = bn.state_dict()
        i = 0
        while not stop.is_set():
            i += 1
            g = gamma_a if i % 2 else gamma_b
            if i % 3:
                bn.gamma = g
            else:
                bn.load_state_dict({**sd, "gamma": g.astype(np.float32), "beta": beta})
            bn.running_var = np.full(c, 1.0 + i % 5)

    def reader():
        while not stop.is_set():
            sd = bn.state_dict()
            g = sd["gamma"].astype(np.float64)
            if not (
                np.array_equal(g, gamma_a.astype(np.float32))
                or np.array_equal(g, gamma_b.astype(np.float32))
            ):
                bad.append("state_dict gamma")
            clone = pickle.loads(pickle.dumps(bn))
            assert clone.num_features == c
            bn.gamma.sum(), bn.running_mean.sum(), bn.grad_gamma, repr(bn)

    def fiddler():
        while not stop.is_set():
            bn.momentum = 0.2
            bn.momentum = None
            bn.training = True
            bn.train()

    def main_work():
        try:
            run = run_threads([forwards, forwards, backwards, backwards])
            bad.extend(run)
        finally:
            stop.set()

    errors = run_threads([main_work, setter, reader, fiddler])
    assert not errors
    assert not bad, bad[:5]
    assert np.isfinite(bn.running_mean).all() and np.isfinite(bn.running_var).all()
    bn.backward(dy)
    assert (bits(bn.grad_gamma), bits(bn.grad_beta)) == grads_serial


def test_set_num_threads_while_layers_run():
    """The OpenMP thread count changed from another thread while forwards and
    backwards run: results do not depend on it, so they stay bitwise serial."""
    shape, axis = LAYOUTS["planar"]
    before = bnpy.get_num_threads()
    try:
        x, dy = data(shape, 40), data(shape, 41)
        layers = [trained_layer(shape, axis).eval() for _ in range(3)]
        want_y = bits(layers[0](x))
        want_dx = bits(layers[0].backward(dy))
        stop = threading.Event()
        bad = []

        def user(bn):
            def work():
                for _ in range(100):
                    if bits(bn(x)) != want_y or bits(bn.backward(dy)) != want_dx:
                        bad.append(1)  # noqa: PERF401 - counted as they happen, in threads

            return work

        def switcher():
            n = 0
            while not stop.is_set():
                n += 1
                bnpy.set_num_threads(1 + n % 3)
                bnpy.get_num_threads()

        def users():
            try:
                bad.extend(run_threads([user(bn) for bn in layers]))
            finally:
                stop.set()

        errors = run_threads([users, switcher])
        assert not errors and not bad
    finally:
        bnpy.set_num_threads(before)


def test_functional_api_in_8_threads_equals_serial():
    shape, axis = LAYOUTS["interleaved"]
    c = shape[axis]
    xs = [data(shape, 50 + k, np.float64) for k in range(4)]
    gamma, beta = np.linspace(0.5, 2, c), np.linspace(-1, 1, c)

    def compute(x):
        y, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=axis)
        dx, dg, db = bnpy.batch_norm_backward(x[::-1], x, gamma, mean, invstd, axis=axis)
        yi = bnpy.batch_norm_inference(x, gamma, beta, mean, 1 / invstd**2, axis=axis)
        return [bits(a) for a in (y, mean, invstd, dx, dg, db, yi)]

    serial = [compute(x) for x in xs]
    bad = []

    def worker(t):
        def work():
            for i in range(25):
                k = (t + i) % len(xs)
                if compute(xs[k]) != serial[k]:
                    bad.append((t, i))

        return work

    assert not run_threads([worker(t) for t in range(8)])
    assert not bad


# --- no deadlock, no crash ------------------------------------------------------------


class CallsBack:
    """An array-like whose conversion calls back into the layer."""

    def __init__(self, bn, values, action):
        self.bn, self.values, self.action = bn, values, action

    def __array__(self, dtype=None, copy=None):
        self.action(self.bn)
        return self.values if dtype is None else self.values.astype(dtype)


CALLBACKS = {
    "forward": lambda bn: bn(data((6, 3), 60)),
    "backward": lambda bn: bn.backward(data((6, 3), 61)),
    "set-gamma": lambda bn: setattr(bn, "gamma", [2.0, 3.0, 4.0]),
    "load_state_dict": lambda bn: bn.load_state_dict(bn.state_dict()),
    "state_dict": lambda bn: bn.state_dict(),
    "pickle": lambda bn: pickle.dumps(bn),
}


@pytest.mark.parametrize("callback", list(CALLBACKS))
def test_argument_conversion_may_call_back_into_the_layer(callback):
    """Arguments are converted before the lock is taken: an __array__ that
    uses the same layer (in the same thread) must not deadlock."""
    bn = trained_layer((6, 3), 1)
    bn(data((6, 3), 62))
    action = CALLBACKS[callback]
    calls = {
        "forward": lambda: bn(CallsBack(bn, data((6, 3), 63), action)),
        "backward": lambda: bn.backward(CallsBack(bn, data((6, 3), 64), action)),
        "set-gamma": lambda: setattr(bn, "gamma", CallsBack(bn, np.ones(3), action)),
        "load_state_dict": lambda: bn.load_state_dict(
            {**bn.state_dict(), "beta": CallsBack(bn, np.zeros(3), action)}
        ),
    }
    results = []

    def work():
        for name, call in calls.items():
            result = call()
            results.append((name, None if result is None else np.shape(result)))

    assert not run_threads([work])
    assert [name for name, _ in results] == list(calls)
    assert results[0][1] == (6, 3) and results[1][1] == (6, 3)
    assert np.array_equal(bn.gamma, np.ones(3, np.float32))
    assert np.array_equal(bn.beta, np.zeros(3, np.float32))


def _stamps_inside(work, margin):
    """Run work(record) on a thread, record(label) marking the start and end
    of each call it makes; meanwhile stamp the time here as fast as Python
    can. Returns, per call, how many stamps fell inside it, `margin` of its
    duration in from either end (so that the Python code around the call,
    which holds the GIL, is left out)."""
    spans, stamps, done = [], [], threading.Event()

    def run():
        work(lambda: spans.append(time.perf_counter()))
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
    thread.join(JOIN_TIMEOUT)
    stamps = np.array(stamps)
    inside = []
    for start, end in zip(spans[0::2], spans[1::2]):
        lo, hi = start + margin * (end - start), end - margin * (end - start)
        inside.append(int(np.count_nonzero((stamps > lo) & (stamps < hi))))
    return inside


def test_the_kernels_release_the_gil():
    """While one thread is inside a long forward or backward, another thread
    keeps running Python code: it stamps the time within the middle of every
    kernel call. Were the GIL held, no Python code could run there at all
    (the control below). Counting stamps, not the longest gap between them,
    holds when the machine is busy: a gap can be the OS's doing, a stamp
    inside the call cannot be there with the GIL held."""
    before_threads, before_interval = bnpy.get_num_threads(), sys.getswitchinterval()
    bnpy.set_num_threads(1)
    sys.setswitchinterval(1e-4)
    try:
        x = data((16, 64, 8192), 70)
        bn = bnpy.BatchNorm(64)

        def kernels(mark):
            for call in (bn, bn.backward):
                mark()
                call(x)
                mark()

        # control: sum() adds a list up in C, holding the GIL throughout
        values = [1.0] * 5_000_000

        def held(mark):
            mark()
            sum(values)
            mark()

        assert _stamps_inside(held, 0.25) == [0]
        for _ in range(3):  # one clean trial is enough: a machine may be busy
            counts = _stamps_inside(kernels, 0.25)
            if min(counts) > 0:
                break
        assert min(counts) > 0, f"no Python ran in the middle of a kernel call: {counts}"
    finally:
        bnpy.set_num_threads(before_threads)
        sys.setswitchinterval(before_interval)
