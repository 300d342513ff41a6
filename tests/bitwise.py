"""Arrays compared to the last bit: the helper the test modules share."""
import numpy as np


def bits(a):
    """dtype, shape and raw bytes of a (None stays None): equal exactly when
    the arrays are bitwise identical, NaN payloads and signed zeros included."""
    if a is None:
        return None
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes()
