"""python -m bnpy demo: the README's set-up command runs it; what it prints is true."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bnpy


def run(*args, cwd):
    """python -m bnpy *args in cwd, importing the bnpy these tests import."""
    env = dict(os.environ)
    package_parent = str(Path(bnpy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "bnpy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's output and the figure it wrote, run once for the module."""
    tmp = tmp_path_factory.mktemp("demo")
    result = run("demo", "--plot", str(tmp / "demo.png"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    return result.stdout, tmp / "demo.png"


def table_rows(stdout):
    """{layer: [plain std, BN std, plain grad, BN grad]} from the per-layer table."""
    rows = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[0].isdigit():
            rows[int(fields[0])] = [float("nan") if f == "-" else float(f) for f in fields[1:]]
    return rows


def test_demo_prints_every_layer_with_vanishing_and_stable_gradients(demo):
    stdout, _ = demo
    rows = table_rows(stdout)
    assert sorted(rows) == list(range(1, 21))
    plain_grad = [rows[layer][2] for layer in range(1, 21)]
    bn_grad = [rows[layer][3] for layer in range(1, 21)]
    assert plain_grad[0] / plain_grad[-1] < 1e-6
    assert 0.1 <= bn_grad[0] / bn_grad[-1] <= 10
    assert all(abs(rows[layer][1] - 1) < 0.01 for layer in range(1, 20))
    assert rows[19][0] < 1e-4 * rows[1][0]


def test_demo_prints_accuracies_batchnorm_learns_and_plain_does_not(demo):
    stdout, _ = demo
    accuracy = {
        split: [
            float(v)
            for v in re.search(
                rf"{split} accuracy \(eval mode\)\s+([\d.]+)%\s+([\d.]+)%", stdout
            ).groups()
        ]
        for split in ("train", "test")
    }
    for plain, with_bn in accuracy.values():
        assert plain < 45  # chance is 33.3%
        assert with_bn > 90


def test_demo_writes_a_png_figure(demo):
    stdout, path = demo
    assert f"figure written to {path}" in stdout
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000


def test_the_other_commands_still_work(tmp_path):
    default = run(cwd=tmp_path)
    assert default.returncode == 0 and "Running statistics" in default.stdout
    usage = run("--help", cwd=tmp_path)
    assert "demo [--plot FILE]" in usage.stdout
    bad = run("demo", "--no-such-option", cwd=tmp_path)
    assert bad.returncode == 2 and "--plot" in bad.stderr


def test_demo_figure_draws_decision_regions_for_both_models(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from bnpy import nn
    from bnpy.__main__ import _plot_demo
    from bnpy.data import spirals

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: saved.append(figure))
    x, labels = spirals(20, rng=0)
    models = {
        name: nn.mlp(2, 3, width=4, depth=3, batch_norm=bn, rng=0)
        for name, bn in (("plain", False), ("BatchNorm", True))
    }
    for model in models.values():
        _, dlogits = nn.softmax_cross_entropy(model(x), labels)
        model.backward(dlogits)
    measured = {
        name: ([nn.batch_std(v) for v in nn.preactivations(m)], nn.weight_gradient_norms(m))
        for name, m in models.items()
    }
    _plot_demo(
        tmp_path / "demo.png",
        models,
        measured,
        {"plain": [1.0, 0.9]},
        (x, labels),
        {"plain": 0.4, "BatchNorm": 0.9},
    )
    titles = [ax.get_title() for ax in saved[0].axes]
    assert "plain: test set, accuracy 40.0%" in titles
    assert "BatchNorm: test set, accuracy 90.0%" in titles
