"""Classification data for experiments: nothing is downloaded.

spirals() generates points in the plane; digits() returns the 8x8 images of
handwritten digits that scikit-learn ships inside its package.

    >>> from bnpy.data import spirals
    >>> x, labels = spirals(100, n_classes=3, rng=0)
    >>> x.shape, labels.shape
    ((300, 2), (300,))
"""

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["spirals", "digits"]


def spirals(
    n_per_class: int, *, n_classes: int = 3, turns: float = 1.0, noise: float = 0.2, rng: Any = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Interleaved spiral arms in the plane, one arm per class.

    Arm k holds n_per_class points at radius r in [0, 1], angle
    2*pi*(turns*r + k/n_classes), plus Gaussian noise of standard deviation
    `noise` (radians) on the angle. No straight line separates the classes:
    a network has to bend the plane. Returns (x, labels): x float32 of shape
    (n_classes * n_per_class, 2), roughly unit scale, and int64 labels,
    in arm order (shuffle or draw random batches before training on them).
    rng is a seed or a numpy Generator: the same seed gives the same data.
    """
    if int(n_per_class) != n_per_class or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive integer, got {n_per_class!r}")
    if int(n_classes) != n_classes or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(rng)
    n_per_class, n_classes = int(n_per_class), int(n_classes)
    radius = np.tile(np.linspace(0.0, 1.0, n_per_class), n_classes)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    angle = 2 * np.pi * (turns * radius + labels / n_classes)
    angle += noise * rng.standard_normal(angle.shape)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return (x / x.std()).astype(np.float32), labels.astype(np.int64)


def digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """scikit-learn's 1,797 handwritten digits as (N, C, H, W) images for a CNN.

    Returns (images, labels): images float32 of shape (1797, 1, 8, 8) with
    values in [0, 1] (the original 0..16 grey levels divided by 16), labels
    int64 digits 0..9, in scikit-learn's order. The data is part of the
    scikit-learn package (``pip install "bnpy[notebooks]"``): no download.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            'bnpy.data.digits needs scikit-learn: pip install "bnpy[notebooks]" '
            "(or pip install scikit-learn)"
        ) from None
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    return images, data.target.astype(np.int64)
