"""Finite-difference gradient checking, for batch normalization and your own layers.

Check a layer you wrote in five lines::

    import numpy as np
    from bnpy.gradcheck import assert_gradients

    def forward(x, w):        return np.tanh(x @ w)
    def backward(dy, x, w):   g = dy * (1 - np.tanh(x @ w) ** 2); return g @ w.T, x.T @ g
    assert_gradients(forward, backward, [np.random.randn(5, 3), np.random.randn(3, 2)])

``forward(*inputs)`` returns an array y; ``backward(dy, *inputs)`` returns one
gradient per input (None for an input without one). The checker draws a random
upstream gradient dy (never all ones, which hides wrong gradients), computes
the analytic gradients with your backward and numerical ones by central
differences in float64, and compares them. ``mode="full"`` compares every
element; ``mode="fast"`` compares directional derivatives along a few random
directions, so a large input costs a few forward calls, not two per element.

On failure :func:`assert_gradients` raises :class:`GradcheckError` (an
AssertionError) whose message is a table: for each input the worst element's
index with the analytic and the numerical value there. :func:`check_layer`
does all this for a :class:`bnpy.BatchNorm` (or any layer with ``forward``,
``backward``, ``gamma``, ``beta``, ``grad_gamma``, ``grad_beta``).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "numerical_vjp",
    "gradcheck",
    "assert_gradients",
    "check_layer",
    "relative_error",
    "GradcheckError",
    "GradcheckReport",
    "InputResult",
]

MODES = ("full", "fast")
_Array = npt.NDArray[np.float64]
# forward(*inputs) -> y and backward(dy, *inputs) -> one gradient (or None) per input
Forward = Callable[..., npt.ArrayLike]
Backward = Callable[..., Any]
_DY_STREAM = 0x6772616463  # "gradc": keys gradcheck's random stream apart from the user's


class GradcheckError(AssertionError):
    """Analytic gradients disagree with finite differences; the message is the report."""

    def __init__(self, report: "GradcheckReport") -> None:
        super().__init__(str(report))
        self.report = report


def numerical_vjp(
    f: Forward, inputs: Sequence[npt.ArrayLike], dy: npt.ArrayLike, *, eps: float = 1e-6
) -> tuple[_Array, ...]:
    """Central differences of <f(*inputs), dy> with respect to each input.

    f takes the inputs (as float64 arrays) and returns an array shaped like dy.
    Each element of each input is moved by +eps and -eps in turn; the result
    is one float64 array per input, shaped like that input.
    """
    arrays = [np.array(a, dtype=np.float64) for a in inputs]
    dy = np.asarray(dy, dtype=np.float64)
    grads = []
    for a in arrays:
        grad = np.zeros_like(a)
        flat, flat_grad = a.reshape(-1), grad.reshape(-1)  # views of a and grad
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + eps
            up = _loss(f, arrays, dy)
            flat[i] = saved - eps
            down = _loss(f, arrays, dy)
            flat[i] = saved
            flat_grad[i] = (up - down) / (2 * eps)
        grads.append(grad)
    return tuple(grads)


def relative_error(analytic: npt.ArrayLike, numeric: npt.ArrayLike) -> float:
    """max|a - n| divided by the larger of max|a| and max|n|.

    Dividing by the largest magnitude, not element by element, keeps entries
    near zero from inflating the error. 0 when both are all zeros.
    """
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(n), initial=0.0))
    error = np.max(np.abs(a - n), initial=0.0)
    return 0.0 if scale == 0.0 else float(error / scale)


def _loss(f: Forward, inputs: Sequence[_Array], dy: _Array) -> float:
    """<f(*inputs), dy> in float64."""
    y = np.asarray(f(*inputs), dtype=np.float64)
    if y.shape != dy.shape:
        raise ValueError(
            f"forward returned shape {y.shape}, expected {dy.shape} "
            "(the shape it returned for the original inputs)"
        )
    return float(np.sum(y * dy))


# ---- the report -----------------------------------------------------------


@dataclass
class InputResult:
    """How one input's gradient compared.

    In full mode ``index`` is the worst element's index into the input and
    ``analytic``/``numerical`` the two values there; in fast mode ``index`` is
    the worst direction's number and the values are directional derivatives.
    """

    name: str
    shape: tuple[int, ...]
    checked: bool  # False when backward returned None for this input
    passed: bool = True
    max_abs_error: float = 0.0
    rel_error: float = 0.0
    index: tuple[int, ...] = ()
    analytic: float = 0.0
    numerical: float = 0.0


@dataclass
class GradcheckReport:
    """The outcome of a gradient check; ``str(report)`` prints it as a table."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    inputs: list[InputResult] = field(default_factory=list)  # one InputResult per input
    mode: str = "full"
    eps: float = 1e-6
    atol: float = 1e-5
    rtol: float = 1e-3

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        where = "worst element" if self.mode == "full" else "worst direction"
        lines = [
            (
                f"gradcheck {verdict} (mode={self.mode}, eps={self.eps:g}, atol={self.atol:g}, "
                f"rtol={self.rtol:g}): max abs error {self.max_abs_error:.3g}, "
                f"max relative error {self.max_rel_error:.3g}"
            ),
            (
                f"  {'input':<10} {'shape':<14} {'abs err':>9} {'rel err':>9}  "
                f"{where:<16} {'analytic':>14} {'numerical':>14}  ok"
            ),
        ]
        for r in self.inputs:
            shape = str(r.shape)
            if not r.checked:
                lines.append(f"  {r.name:<10} {shape:<14} {'(no gradient: not checked)':>20}")
                continue
            index = str(r.index if len(r.index) != 1 else r.index[0])
            lines.append(
                f"  {r.name:<10} {shape:<14} {r.max_abs_error:>9.2e} {r.rel_error:>9.2e}  "
                f"{index:<16} {r.analytic:>14.7g} {r.numerical:>14.7g}  "
                f"{'yes' if r.passed else 'NO'}"
            )
        return "\n".join(lines)


def _compare(
    name: str,
    analytic: _Array,
    numerical: _Array,
    atol: float,
    rtol: float,
    index_of: Callable[[int], tuple[int, ...]],
) -> InputResult:
    """InputResult for two float64 arrays of one shape, element by element.

    The worst element is the one that most exceeds atol + rtol * |numerical|;
    index_of turns its flat position into the index the report shows.
    """
    diff = np.abs(analytic - numerical)
    allowed = atol + rtol * np.abs(numerical)
    if diff.size == 0:
        return InputResult(name, analytic.shape, True)
    worst = int(np.argmax(diff / allowed))
    return InputResult(
        name,
        analytic.shape,
        True,
        passed=bool(np.all(diff <= allowed)),
        max_abs_error=float(diff.max()),
        rel_error=relative_error(analytic, numerical),
        index=index_of(worst),
        analytic=float(analytic.reshape(-1)[worst]),
        numerical=float(numerical.reshape(-1)[worst]),
    )


# ---- the checks -----------------------------------------------------------


def _validate_options(eps: float, atol: float, rtol: float, mode: str, directions: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'full' or 'fast', got {mode!r}")
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol!r}, rtol={rtol!r}")
    if int(directions) != directions or directions < 1:
        raise ValueError(f"directions must be a positive integer, got {directions!r}")


def _analytic_gradients(
    backward: Backward, dy: _Array, inputs: Sequence[_Array]
) -> list[_Array | None]:
    grads = backward(dy, *inputs)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    if len(grads) != len(inputs):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(inputs)} inputs")
    result: list[_Array | None] = []
    for i, (g, a) in enumerate(zip(grads, inputs)):
        if g is None:
            result.append(None)
            continue
        grad = np.array(g, dtype=np.float64)
        if grad.shape != a.shape:
            raise ValueError(
                f"backward's gradient {i} has shape {grad.shape}, but input {i} has shape {a.shape}"
            )
        result.append(grad)
    return result


def _directional(
    f: Forward, inputs: Sequence[_Array], dy: _Array, which: int, direction: _Array, eps: float
) -> float:
    """Central difference of <f, dy> along `direction` in input `which`."""
    base = inputs[which]
    moved = list(inputs)
    moved[which] = base + eps * direction
    up = _loss(f, moved, dy)
    moved[which] = base - eps * direction
    down = _loss(f, moved, dy)
    return (up - down) / (2 * eps)


def _unravel(shape: tuple[int, ...]) -> Callable[[int], tuple[int, ...]]:
    """The index into an array of this shape of each flat position."""
    return lambda flat: tuple(int(i) for i in np.unravel_index(flat, shape))


def gradcheck(
    forward: Forward,
    backward: Backward,
    inputs: Sequence[npt.ArrayLike],
    *,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    mode: str = "full",
    seed: int = 0,
    directions: int = 3,
    names: Sequence[str] | None = None,
) -> GradcheckReport:
    """Compare backward's gradients with central finite differences of forward.

    forward(*inputs) returns an array y; backward(dy, *inputs) returns one
    gradient per input (None where an input has none). Inputs are converted to
    float64 copies; forward is called on them, then backward, then forward
    again for the differences. dy is drawn from N(0, 1) by a generator keyed
    by `seed` (not default_rng(seed) itself, which the caller's data may come
    from).

    mode="full" checks every element: |a - n| <= atol + rtol * |n|.
    mode="fast" checks `directions` random directions per input, comparing
    <a, v> with the derivative of <forward, dy> along v: 2 * directions
    forward calls per input, whatever its size.

    Returns a GradcheckReport (truthy when it passed); `names` labels the inputs.
    """
    _validate_options(eps, atol, rtol, mode, directions)
    arrays = [np.array(a, dtype=np.float64) for a in inputs]
    labels = list(names) if names is not None else [f"input {i}" for i in range(len(arrays))]
    if len(labels) != len(arrays):
        raise ValueError(f"got {len(labels)} names for {len(arrays)} inputs")
    # a stream of its own: data a user drew from default_rng(seed) must not
    # coincide with dy (in training-mode batch norm, a dy that is an affine
    # function of x-hat has dx = 0, and any wrong dx would pass)
    rng = np.random.default_rng([seed, _DY_STREAM])
    y = np.asarray(forward(*arrays), dtype=np.float64)
    dy = rng.standard_normal(y.shape)
    analytic = _analytic_gradients(backward, dy, arrays)

    if mode == "full":
        numerical = numerical_vjp(forward, arrays, dy, eps=eps)
        results = [
            InputResult(name, a.shape, False)
            if g is None
            else _compare(name, g, n, atol, rtol, _unravel(a.shape))
            for name, a, g, n in zip(labels, arrays, analytic, numerical)
        ]
    else:
        results = []
        for which, (name, a, g) in enumerate(zip(labels, arrays, analytic)):
            if g is None:
                results.append(InputResult(name, a.shape, False))
                continue
            vs = [rng.standard_normal(a.shape) for _ in range(directions)]
            along_a = np.array([np.sum(g * v) for v in vs])
            along_n = np.array([_directional(forward, arrays, dy, which, v, eps) for v in vs])
            result = _compare(name, along_a, along_n, atol, rtol, lambda k: (k,))
            result.shape = a.shape
            results.append(result)

    checked = [r for r in results if r.checked]
    return GradcheckReport(
        passed=all(r.passed for r in checked),
        max_abs_error=max((r.max_abs_error for r in checked), default=0.0),
        max_rel_error=max((r.rel_error for r in checked), default=0.0),
        inputs=results,
        mode=mode,
        eps=eps,
        atol=atol,
        rtol=rtol,
    )


def assert_gradients(
    forward: Forward, backward: Backward, inputs: Sequence[npt.ArrayLike], **options: Any
) -> GradcheckReport:
    """gradcheck(...), raising GradcheckError with the report's table on failure.

    Returns the report when the gradients agree.
    """
    report = gradcheck(forward, backward, inputs, **options)
    if not report.passed:
        raise GradcheckError(report)
    return report


def _snapshot(layer: Any) -> tuple[str, dict[str, Any]]:
    """What check_layer must put back: the state dict, or gamma and beta."""
    if hasattr(layer, "state_dict") and hasattr(layer, "load_state_dict"):
        return ("state_dict", layer.state_dict())
    params = {
        k: np.array(getattr(layer, k))
        for k in ("gamma", "beta")
        if getattr(layer, k, None) is not None
    }
    return ("params", params)


def _restore(layer: Any, snapshot: tuple[str, dict[str, Any]]) -> None:
    kind, saved = snapshot
    if kind == "state_dict":
        layer.load_state_dict(saved)
    else:
        for k, v in saved.items():
            setattr(layer, k, v)


def check_layer(layer: Any, x: npt.ArrayLike, **options: Any) -> GradcheckReport:
    """Check a batch-norm-like layer's gradients for x, gamma and beta.

    `layer` has forward(x), backward(dy) -> dx and the attributes gamma, beta
    (None when it has none), grad_gamma and grad_beta, like bnpy.BatchNorm
    (bnpy.RMSNorm has gamma alone).
    The check runs in the layer's current mode (training or eval) and leaves
    its parameters and running statistics as they were. Options are those of
    gradcheck. A float32 layer cannot resolve steps of 1e-6, and its rounding
    noise in the differences is about 1e-4: unless given, eps defaults to
    1e-3, atol to 1e-3 and rtol to 1e-2 for it. Check in float64 for rigour.
    """
    if getattr(layer, "dtype", np.float64) == np.float32:
        options.setdefault("eps", 1e-3)
        options.setdefault("atol", 1e-3)
        options.setdefault("rtol", 1e-2)
    # the parameters it has: gamma and beta, gamma alone (RMSNorm), or none
    params = [k for k in ("gamma", "beta") if getattr(layer, k, None) is not None]
    snapshot = _snapshot(layer)

    def set_params(*values: _Array) -> None:
        for name, value in zip(params, values):
            setattr(layer, name, value)

    def forward(x_: _Array, *values: _Array) -> Any:
        set_params(*values)
        return layer.forward(x_)

    def backward(dy: _Array, x_: _Array, *values: _Array) -> tuple[Any, ...]:
        set_params(*values)
        layer.forward(x_)  # the forward that backward differentiates
        dx = layer.backward(dy)
        return (dx, *(getattr(layer, "grad_" + name) for name in params))

    inputs = [x] + [getattr(layer, name) for name in params]
    try:
        return gradcheck(forward, backward, inputs, names=["x", *params], **options)
    finally:
        _restore(layer, snapshot)
