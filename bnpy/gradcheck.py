"""Finite-difference gradient checking.

``numerical_vjp`` differentiates any function of NumPy arrays by central
differences, one element at a time, in float64: the vector-Jacobian product
that a backward function must reproduce.
"""
import numpy as np


def numerical_vjp(f, inputs, dy, *, eps=1e-6):
    """Central differences of <f(*inputs), dy> with respect to each input.

    f takes the inputs (as float64 arrays) and returns an array shaped like dy.
    Each element of each input is moved by +eps and -eps in turn; the result
    is one float64 array per input, shaped like that input.
    """
    inputs = [np.array(a, dtype=np.float64) for a in inputs]
    dy = np.asarray(dy, dtype=np.float64)

    def loss():
        return float(np.sum(np.asarray(f(*inputs), dtype=np.float64) * dy))

    grads = []
    for a in inputs:
        grad = np.zeros_like(a)
        flat, flat_grad = a.reshape(-1), grad.reshape(-1)  # views of a and grad
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + eps
            up = loss()
            flat[i] = saved - eps
            down = loss()
            flat[i] = saved
            flat_grad[i] = (up - down) / (2 * eps)
        grads.append(grad)
    return tuple(grads)


def relative_error(analytic, numeric):
    """max|a - n| divided by the larger of max|a| and max|n|.

    Dividing by the largest magnitude, not element by element, keeps entries
    near zero from inflating the error. 0 when both are all zeros.
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    scale = max(np.max(np.abs(analytic), initial=0.0), np.max(np.abs(numeric), initial=0.0))
    error = np.max(np.abs(analytic - numeric), initial=0.0)
    return 0.0 if scale == 0.0 else error / scale
