"""bnpy.viz: each call draws what it says, labelled, without touching the model's state."""

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed

import matplotlib.pyplot as plt
import numpy as np
import pytest

import bnpy
from bnpy import nn, viz
from bnpy.data import spirals


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def trained_pass():
    """A small BatchNorm network after one forward and backward on spirals."""
    x, labels = spirals(30, rng=0)
    model = nn.mlp(2, 3, width=8, depth=5, batch_norm=True, rng=0)
    _, dlogits = nn.softmax_cross_entropy(model(x), labels)
    model.backward(dlogits)
    return model, x, labels


def assert_labelled(ax, n_legend_entries):
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    legend = ax.get_legend()
    assert legend is not None and len(legend.get_texts()) == n_legend_entries


def test_activation_histograms_draw_one_row_per_layer(trained_pass):
    model, _, _ = trained_pass
    ax = viz.activation_histograms(model, label="with BatchNorm")
    assert_labelled(ax, 2)  # the distribution and the mean
    assert len(ax.collections) == 4  # one filled histogram per pre-activation
    assert len(ax.lines) == 4  # one mean tick per layer
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3", "4"]
    # each row's histogram starts at its tick, the first layer at the top
    bottoms = [c.get_paths()[0].vertices[:, 1].min() for c in ax.collections]
    np.testing.assert_allclose(bottoms, ax.get_yticks())
    assert bottoms == sorted(bottoms, reverse=True)
    # BatchNorm output has mean 0: every tick sits at 0
    for line in ax.lines:
        np.testing.assert_allclose(line.get_xdata(), 0, atol=1e-5)


def test_activation_histograms_take_a_list_and_an_axes():
    _, ax = plt.subplots()
    values = [np.full(10, 3.0), np.linspace(-1, 1, 10)]
    assert viz.activation_histograms(values, ax=ax, value_range=(-2, 4)) is ax
    assert ax.get_xlim() == (-2, 4)
    assert len(ax.collections) == 2


def test_gradient_norms_and_activation_stds_plot_one_point_per_layer(trained_pass):
    model, _, _ = trained_pass
    ax = viz.gradient_norms({"net": model, "given": [1.0, 2.0, 3.0]})
    assert_labelled(ax, 2)
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), nn.weight_gradient_norms(model))
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3, 4, 5])
    ax = viz.activation_stds({"net": model})
    assert_labelled(ax, 1)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 1, atol=1e-3)


def test_loss_curves_smooth_with_a_trailing_moving_average():
    ax = viz.loss_curves({"a": [4.0, 2.0, 0.0, 2.0], "b": [1.0, 1.0, np.nan, np.nan]}, smooth=2)
    assert_labelled(ax, 2)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [4.0, 3.0, 1.0, 1.0])
    assert np.isnan(ax.lines[1].get_ydata()[2:]).all()


def test_running_stats_draw_the_target(trained_pass):
    ax = viz.running_stats({"momentum=0.1": [0.1, 0.19, 0.271]}, target=1.0)
    assert_labelled(ax, 2)
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [1.0, 1.0])


def test_decision_regions_leave_the_model_as_it_was(trained_pass):
    model, x, labels = trained_pass
    bn = model[1]
    before = bn.state_dict()
    ax = viz.decision_regions(model, x, labels, resolution=20)
    assert_labelled(ax, 3)  # one entry per class
    assert model.training and bn.training
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    model.eval()
    viz.decision_regions(model, x, labels, resolution=20)
    assert not model.training


def test_batchnorm_layer_goes_through_viz_in_a_sequential():
    model = nn.Sequential(nn.Linear(2, 4, rng=0), bnpy.BatchNorm(4), nn.Sigmoid())
    model(np.random.default_rng(0).normal(size=(16, 2)))
    ax = viz.activation_stds({"bn": model})
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0], atol=1e-3)


def test_loss_curves_on_a_log_axis_label_plain_numbers_within_a_decade():
    ax = viz.loss_curves({"a": np.geomspace(3.0, 0.3, 50)}, log=True)
    ax.figure.canvas.draw()
    low, high = ax.get_ylim()
    labels = [
        t.get_text()
        for t, value in zip(ax.get_yticklabels(), ax.get_yticks())
        if low <= value <= high
    ]
    assert ax.get_yscale() == "log"
    assert {"0.5", "1", "2"} <= set(labels)  # not only 10^0


def test_interactive_draws_once_then_redraws_on_each_change():
    import ipywidgets as widgets

    calls = []

    def draw(depth, batch_norm):
        calls.append((depth, batch_norm))
        figure, ax = plt.subplots()
        ax.plot([0, depth])
        return figure

    depth, batch_norm = widgets.IntSlider(value=5, min=1, max=30), widgets.Checkbox(value=True)
    box = viz.interactive(draw, depth=depth, batch_norm=batch_norm)
    assert calls == [(5, True)]  # the static figure, with the initial values
    assert depth in box.children[0].children and batch_norm in box.children[0].children
    depth.value = 12
    batch_norm.value = False
    assert calls == [(5, True), (12, True), (12, False)]
    assert plt.get_fignums() == []  # every figure shown is closed: none is drawn twice


def test_interactive_rejects_a_control_without_a_value():
    with pytest.raises(TypeError, match="control 'depth' must be an ipywidgets widget"):
        viz.interactive(lambda depth: None, depth=5)
