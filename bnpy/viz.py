"""bnpy.viz: the notebooks' pictures, one call each, for your own networks too.

Needs matplotlib (``pip install "bnpy[notebooks]"``). Every function draws
into ``ax`` (a new figure's axes when None), gives it a title, axis labels and
a legend, and returns it::

    from bnpy import nn, viz
    model = nn.mlp(2, 3, batch_norm=True, rng=0)
    loss, dlogits = nn.softmax_cross_entropy(model(x), labels)
    model.backward(dlogits)
    viz.activation_histograms(model)             # per-layer distributions
    viz.gradient_norms({"with BatchNorm": model})  # weight-gradient norm by depth

Curves are given as a dict {legend label: values}, so that one picture
compares several networks or settings. :func:`interactive` puts ipywidgets
controls over any drawing function.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from . import nn

# {legend label: a Sequential after a forward/backward, or the values already measured}
Models = Mapping[str, "nn.Sequential | npt.ArrayLike"]

__all__ = [
    "activation_histograms",
    "activation_stds",
    "gradient_norms",
    "loss_curves",
    "running_stats",
    "decision_regions",
    "interactive",
]


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    return ax


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, legend: bool = True) -> Axes:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize="small")
    return ax


def _common_range(values: Sequence[npt.ArrayLike], clip: float) -> tuple[float, float]:
    """The [clip, 100 - clip] percentile range of all values pooled (finite ones)."""
    pooled = np.concatenate([np.ravel(v) for v in values]).astype(np.float64)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return -1.0, 1.0
    low, high = np.percentile(pooled, [clip, 100 - clip])
    if low == high:
        low, high = low - 0.5, high + 0.5
    return float(low), float(high)


def activation_histograms(
    values: "nn.Sequential | Sequence[npt.ArrayLike]",
    *,
    ax: Axes | None = None,
    bins: int = 60,
    value_range: tuple[float, float] | None = None,
    clip: float = 0.5,
    title: str = "Pre-activations by layer",
    color: str = "C0",
    label: str | None = None,
) -> Axes:
    """A ridgeline of histograms: one row per layer, the first layer at the top.

    values is a list of arrays (one per layer) or a Sequential after a
    forward, whose pre-activations (nn.preactivations) are drawn. Each row
    is scaled to the same height; a tick marks the layer's mean. Every row
    shares value_range, by default the [clip, 100 - clip] percentiles of
    all values, so a few outliers do not squeeze the rest.
    """
    layers = nn.preactivations(values) if isinstance(values, nn.Sequential) else list(values)
    ax = _axes(ax)
    low, high = value_range or _common_range(layers, clip)
    for row, layer in enumerate(layers):
        v = np.ravel(layer).astype(np.float64)
        counts, edges = np.histogram(v, bins=bins, range=(low, high))
        heights = 0.9 * counts / max(counts.max(), 1)
        base = -row
        ax.fill_between(
            edges[:-1],
            base,
            base + heights,
            step="post",
            color=color,
            alpha=0.6,
            linewidth=0,
            label=label if row == 0 else None,
        )
        mean = v.mean()
        if low <= mean <= high:
            ax.plot(
                [mean, mean],
                [base, base + 0.9],
                color="k",
                linewidth=1,
                label="mean" if row == 0 else None,
            )
    step = max(1, len(layers) // 10)
    rows = list(range(0, len(layers), step))
    ax.set_yticks([-r for r in rows], [str(r + 1) for r in rows])
    ax.set_xlim(low, high)
    return _finish(ax, title, "value", "layer (first at the top)")


def _by_depth(
    curves: Mapping[str, npt.ArrayLike], ax: Axes | None, title: str, ylabel: str, log: bool
) -> Axes:
    ax = _axes(ax)
    for label, measured in curves.items():
        values = np.asarray(measured, dtype=np.float64)
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(ax, title, "layer (input side = 1)", ylabel)


def activation_stds(
    models: Models,
    *,
    ax: Axes | None = None,
    title: str = "Pre-activation spread by layer",
    log: bool = True,
) -> Axes:
    """Each layer's pre-activation std over the batch (nn.batch_std), by depth.

    models maps a legend label to a Sequential after a forward, or to a
    sequence of per-layer values already measured.
    """
    curves = {
        label: [nn.batch_std(v) for v in nn.preactivations(m)]
        if isinstance(m, nn.Sequential)
        else m
        for label, m in models.items()
    }
    return _by_depth(curves, ax, title, "std over the batch (mean over units)", log)


def gradient_norms(
    models: Models,
    *,
    ax: Axes | None = None,
    title: str = "Weight-gradient norm by layer",
    log: bool = True,
) -> Axes:
    """The norm of each Linear layer's weight gradient, by depth.

    models maps a legend label to a Sequential after a backward
    (nn.weight_gradient_norms), or to a sequence of norms already measured.
    """
    curves = {
        label: nn.weight_gradient_norms(m) if isinstance(m, nn.Sequential) else m
        for label, m in models.items()
    }
    return _by_depth(curves, ax, title, "‖dL/dW‖ (Frobenius)", log)


def _moving_average(steps: npt.ArrayLike, window: int) -> npt.NDArray[np.float64]:
    """Mean over the last `window` steps (fewer at the start); NaN stays NaN."""
    values = np.asarray(steps, dtype=np.float64)
    if window <= 1:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    averages: npt.NDArray[np.float64] = (sums[ends] - sums[starts]) / (ends - starts)
    return averages


def loss_curves(
    curves: Mapping[str, npt.ArrayLike],
    *,
    ax: Axes | None = None,
    smooth: int = 1,
    log: bool = False,
    title: str = "Training loss",
    ylabel: str = "cross-entropy loss",
) -> Axes:
    """Loss (or any per-step value) against the step, one line per entry.

    smooth > 1 draws the moving average over that many steps. NaN entries
    (nn.fit's mark of a diverged run) leave the rest of the line empty.
    """
    ax = _axes(ax)
    for label, values in curves.items():
        ax.plot(_moving_average(values, smooth), label=label)
    if log:
        _plain_log_y(ax)
    return _finish(ax, title, "step", ylabel)


def _plain_log_y(ax: Axes) -> None:
    """A logarithmic y axis labelled at 1, 2 and 5 of every decade, as plain numbers.

    A loss between 0.3 and 3 then reads 0.5, 1, 2 rather than just 10^0.
    """
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def running_stats(
    histories: Mapping[str, npt.ArrayLike],
    *,
    target: float | None = None,
    ax: Axes | None = None,
    title: str = "Running statistic over steps",
    ylabel: str = "running mean",
    target_label: str = "true value",
) -> Axes:
    """A running statistic recorded at every step, one line per setting.

    histories maps a legend label to the values recorded after each step
    (for instance bn.running_mean[0] for several momentum values); target,
    when given, is drawn as a dashed horizontal line.
    """
    ax = _axes(ax)
    for label, history in histories.items():
        values = np.asarray(history, dtype=np.float64)
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    if target is not None:
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=target_label)
    return _finish(ax, title, "step", ylabel)


def decision_regions(
    model: Any,
    x: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    ax: Axes | None = None,
    resolution: int = 200,
    title: str = "Decision regions",
) -> Axes:
    """The class a 2-D classifier predicts over the plane, with the data on top.

    The model runs in eval mode (running statistics, no state changes) and
    is put back in the mode it was in.
    """
    ax = _axes(ax)
    points = np.asarray(x, dtype=np.float64)
    classes = np.asarray(labels)
    margin = 0.1 * (points.max(axis=0) - points.min(axis=0))
    (x0, y0), (x1, y1) = points.min(axis=0) - margin, points.max(axis=0) + margin
    gx, gy = np.meshgrid(np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution))
    was_training = model.training
    model.eval()
    try:
        predicted = np.argmax(model.forward(np.column_stack([gx.ravel(), gy.ravel()])), axis=1)
    finally:
        model.train(was_training)
    n_classes = int(max(classes.max(), predicted.max())) + 1
    colors = [f"C{k}" for k in range(n_classes)]
    ax.contourf(
        gx,
        gy,
        predicted.reshape(gx.shape),
        levels=np.arange(n_classes + 1) - 0.5,
        colors=colors,
        alpha=0.25,
    )
    for k in range(n_classes):
        members = points[classes == k]
        ax.scatter(members[:, 0], members[:, 1], s=8, color=colors[k], label=f"class {k}")
    ax.set_aspect("equal")
    return _finish(ax, title, "x₁", "x₂")


def interactive(draw: Callable[..., Figure], **controls: Any) -> Any:
    """Draw once now, then redraw whenever one of the ipywidgets controls changes.

    draw(**values) makes a new figure and returns it; controls maps each of
    its keyword arguments to a widget (an IntSlider, a Dropdown, a Checkbox...)
    whose value is passed. The first figure, drawn with the controls' initial
    values, is displayed as an ordinary output, so a notebook run without a
    live kernel (or on a web page) keeps it. Returns the controls and an
    output area in a box: display it (the last line of a cell does), move a
    control, and the redrawn figure appears under the controls. Needs
    ipywidgets (``pip install "bnpy[notebooks]"``).
    """
    import ipywidgets
    from IPython.display import display

    for name, control in controls.items():
        if not isinstance(control, ipywidgets.ValueWidget):
            raise TypeError(
                f"control {name!r} must be an ipywidgets widget with a value, "
                f"got {type(control).__name__}"
            )
    output = ipywidgets.Output()

    def show(_change: object = None) -> None:
        figure = draw(**{name: control.value for name, control in controls.items()})
        display(figure)  # type: ignore[no-untyped-call]  # IPython does not annotate it
        plt.close(figure)

    def redraw(change: object) -> None:
        with output:
            output.clear_output(wait=True)
            show(change)

    for control in controls.values():
        control.observe(redraw, names="value")
    show()
    return ipywidgets.VBox(
        [
            ipywidgets.HBox(
                list(controls.values()), layout=ipywidgets.Layout(flex_flow="row wrap")
            ),
            output,
        ]
    )
