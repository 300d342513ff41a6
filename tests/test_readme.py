"""The README's Python examples run as written (so the README stays true)."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks():
    if not README.exists():  # an installed copy of the tests without the repository
        pytest.skip("README.md is not beside the tests")
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_tour_and_the_functional_api_run():
    tour, functional = python_blocks()[:2]
    namespace = {}
    exec(tour, namespace)
    channels = namespace["x"].shape[1]
    namespace.update(
        gamma=np.ones(channels, np.float32),
        beta=np.zeros(channels, np.float32),
        dy=np.ones_like(namespace["x"]),
        running_mean=np.zeros(channels),
        running_var=np.ones(channels),
    )
    exec(functional, namespace)
    assert namespace["dx"].shape == namespace["x"].shape


def test_every_other_example_runs():
    import bnpy
    from bnpy import nn

    for block in python_blocks()[2:]:
        model = nn.mlp(64, 3, width=8, depth=2, batch_norm=True, rng=0)
        namespace = {
            "np": np,
            "bnpy": bnpy,
            "nn": nn,
            "model": model,
            "bn": bnpy.BatchNorm(64),
            "x_train": np.random.default_rng(0).normal(size=(600, 64)),
        }
        exec(block, namespace)
