"""Arrays compared to the last bit, and arrays placed within a cache line:
the helpers the test modules share."""

import numpy as np


def bits(a):
    """dtype, shape and raw bytes of a (None stays None): equal exactly when
    the arrays are bitwise identical, NaN payloads and signed zeros included."""
    if a is None:
        return None
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes()


def at_line_offset(shape, dtype, offset):
    """An array of NaN whose first value lies `offset` values past a 64-byte
    line (NaN, so that a value left unwritten shows: freed memory may still
    hold the right bits)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.full(count + 64 // dtype.itemsize * 2, np.nan, dtype)
    skip = (-raw.ctypes.data % 64) // dtype.itemsize + offset
    return raw[skip : skip + count].reshape(shape)


def assert_same_bits_at_line_offsets(write, want, offsets):
    """write(out) into an array of NaN like want, placed at each of `offsets`
    values past a line: every value is written, and out has want's bits."""
    for offset in offsets:
        out = at_line_offset(want.shape, want.dtype, offset)
        write(out)
        assert np.isfinite(out).all(), f"offset {offset}: values left unwritten"
        assert out.tobytes() == want.tobytes(), f"offset {offset}"
