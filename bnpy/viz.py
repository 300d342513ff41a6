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
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from . import nn

__all__ = [
    "activation_histograms",
    "activation_stds",
    "gradient_norms",
    "loss_curves",
    "running_stats",
    "decision_regions",
    "interactive",
]


def _axes(ax):
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    return ax


def _finish(ax, title, xlabel, ylabel, legend=True):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize="small")
    return ax


def _common_range(values, clip):
    """The [clip, 100 - clip] percentile range of all values pooled (finite ones)."""
    pooled = np.concatenate([np.ravel(v) for v in values]).astype(np.float64)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return -1.0, 1.0
    low, high = np.percentile(pooled, [clip, 100 - clip])
    if low == high:
        low, high = low - 0.5, high + 0.5
    return float(low), float(high)


def activation_histograms(values, *, ax=None, bins=60, value_range=None, clip=0.5,
                          title="Pre-activations by layer", color="C0", label=None):
    """A ridgeline of histograms: one row per layer, the first layer at the top.

    values is a list of arrays (one per layer) or a Sequential after a
    forward, whose pre-activations (nn.preactivations) are drawn. Each row
    is scaled to the same height; a tick marks the layer's mean. Every row
    shares value_range, by default the [clip, 100 - clip] percentiles of
    all values, so a few outliers do not squeeze the rest.
    """
    if hasattr(values, "layers"):
        values = nn.preactivations(values)
    ax = _axes(ax)
    low, high = value_range or _common_range(values, clip)
    for row, v in enumerate(values):
        v = np.ravel(v).astype(np.float64)
        counts, edges = np.histogram(v, bins=bins, range=(low, high))
        heights = 0.9 * counts / max(counts.max(), 1)
        base = -row
        ax.fill_between(edges[:-1], base, base + heights, step="post", color=color,
                        alpha=0.6, linewidth=0, label=label if row == 0 else None)
        mean = v.mean()
        if low <= mean <= high:
            ax.plot([mean, mean], [base, base + 0.9], color="k", linewidth=1,
                    label="mean" if row == 0 else None)
    step = max(1, len(values) // 10)
    rows = list(range(0, len(values), step))
    ax.set_yticks([-r for r in rows], [str(r + 1) for r in rows])
    ax.set_xlim(low, high)
    return _finish(ax, title, "value", "layer (first at the top)")


def _by_depth(curves, ax, title, ylabel, log):
    ax = _axes(ax)
    for label, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(ax, title, "layer (input side = 1)", ylabel)


def activation_stds(models, *, ax=None, title="Pre-activation spread by layer", log=True):
    """Each layer's pre-activation std over the batch (nn.batch_std), by depth.

    models maps a legend label to a Sequential after a forward, or to a
    sequence of per-layer values already measured.
    """
    curves = {label: [nn.batch_std(v) for v in nn.preactivations(m)]
              if hasattr(m, "layers") else m for label, m in models.items()}
    return _by_depth(curves, ax, title, "std over the batch (mean over units)", log)


def gradient_norms(models, *, ax=None, title="Weight-gradient norm by layer", log=True):
    """The norm of each Linear layer's weight gradient, by depth.

    models maps a legend label to a Sequential after a backward
    (nn.weight_gradient_norms), or to a sequence of norms already measured.
    """
    curves = {label: nn.weight_gradient_norms(m) if hasattr(m, "layers") else m
              for label, m in models.items()}
    return _by_depth(curves, ax, title, "‖dL/dW‖ (Frobenius)", log)


def _moving_average(values, window):
    """Mean over the last `window` steps (fewer at the start); NaN stays NaN."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_curves(curves, *, ax=None, smooth=1, log=False, title="Training loss",
                ylabel="cross-entropy loss"):
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


def _plain_log_y(ax):
    """A logarithmic y axis labelled at 1, 2 and 5 of every decade, as plain numbers.

    A loss between 0.3 and 3 then reads 0.5, 1, 2 rather than just 10^0.
    """
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def running_stats(histories, *, target=None, ax=None, title="Running statistic over steps",
                  ylabel="running mean", target_label="true value"):
    """A running statistic recorded at every step, one line per setting.

    histories maps a legend label to the values recorded after each step
    (for instance bn.running_mean[0] for several momentum values); target,
    when given, is drawn as a dashed horizontal line.
    """
    ax = _axes(ax)
    for label, values in histories.items():
        values = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    if target is not None:
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=target_label)
    return _finish(ax, title, "step", ylabel)


def decision_regions(model, x, labels, *, ax=None, resolution=200, title="Decision regions"):
    """The class a 2-D classifier predicts over the plane, with the data on top.

    The model runs in eval mode (running statistics, no state changes) and
    is put back in the mode it was in.
    """
    ax = _axes(ax)
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    margin = 0.1 * (x.max(axis=0) - x.min(axis=0))
    (x0, y0), (x1, y1) = x.min(axis=0) - margin, x.max(axis=0) + margin
    gx, gy = np.meshgrid(np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution))
    was_training = model.training
    model.eval()
    try:
        predicted = np.argmax(model.forward(np.column_stack([gx.ravel(), gy.ravel()])), axis=1)
    finally:
        model.train(was_training)
    n_classes = int(max(labels.max(), predicted.max())) + 1
    colors = [f"C{k}" for k in range(n_classes)]
    ax.contourf(gx, gy, predicted.reshape(gx.shape), levels=np.arange(n_classes + 1) - 0.5,
                colors=colors, alpha=0.25)
    for k in range(n_classes):
        ax.scatter(*x[labels == k].T, s=8, color=colors[k], label=f"class {k}")
    ax.set_aspect("equal")
    return _finish(ax, title, "x₁", "x₂")


def interactive(draw, **controls):
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
            raise TypeError(f"control {name!r} must be an ipywidgets widget with a value, "
                            f"got {type(control).__name__}")
    output = ipywidgets.Output()

    def show(_change=None):
        figure = draw(**{name: control.value for name, control in controls.items()})
        display(figure)
        plt.close(figure)

    def redraw(change):
        with output:
            output.clear_output(wait=True)
            show(change)

    for control in controls.values():
        control.observe(redraw, names="value")
    show()
    return ipywidgets.VBox([ipywidgets.HBox(list(controls.values()),
                                            layout=ipywidgets.Layout(flex_flow="row wrap")),
                            output])
