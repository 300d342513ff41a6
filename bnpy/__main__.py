"""python -m bnpy: a short demonstration of what batch normalization does."""

import argparse
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

import bnpy
from bnpy import nn
from bnpy._progress import Progress
from bnpy.data import spirals
from bnpy.gradcheck import GradcheckReport, numerical_vjp, relative_error

_Array = npt.NDArray[Any]
# per model: (pre-activation std by layer, weight-gradient norm by layer)
_Measured = dict[str, tuple[list[float], _Array]]


def _generated_batch(rng: np.random.Generator, n: int = 256) -> tuple[_Array, _Array, _Array]:
    """(n, 4) float32 values whose features live on very different scales."""
    means = np.array([5.0, -3.0, 100.0, 0.01])
    stds = np.array([2.0, 0.5, 30.0, 0.05])
    return (rng.normal(size=(n, 4)) * stds + means).astype(np.float32), means, stds


def _show_normalization(rng: np.random.Generator) -> None:
    x, _, _ = _generated_batch(rng)
    bn = bnpy.BatchNorm(4)
    y = bn(x)
    print("1. One training-mode forward on a (256, 4) batch: every feature comes out")
    print("   with mean 0 and standard deviation 1, whatever its scale going in.\n")
    print(f"   {'feature':>7} {'mean in':>10} {'std in':>10} {'mean out':>10} {'std out':>9}")
    for c in range(4):
        print(
            f"   {c:>7} {x[:, c].mean():>10.4g} {x[:, c].std():>10.4g} "
            f"{y[:, c].mean():>10.2e} {y[:, c].std():>9.5f}"
        )
    print("   (a std out just under 1 is eps at work: sqrt(var / (var + eps)), eps = 1e-5)")


def _show_running_stats(rng: np.random.Generator) -> bnpy.BatchNorm:
    _, means, stds = _generated_batch(rng)
    bn = bnpy.BatchNorm(4, momentum=0.1)
    for _ in range(100):
        bn(_generated_batch(rng)[0])
    print("\n2. Running statistics after 100 training steps (momentum=0.1),")
    print("   against the distribution the batches were drawn from:\n")
    print(
        f"   {'feature':>7} {'running mean':>13} {'true mean':>10} "
        f"{'running var':>12} {'true var':>10}"
    )
    running_mean, running_var = bn.running_mean, bn.running_var
    assert running_mean is not None and running_var is not None  # tracked, by default
    for c in range(4):
        print(
            f"   {c:>7} {running_mean[c]:>13.4g} {means[c]:>10.4g} "
            f"{running_var[c]:>12.4g} {stds[c] ** 2:>10.4g}"
        )
    return bn


def _show_train_vs_eval(rng: np.random.Generator, bn: bnpy.BatchNorm) -> None:
    x = _generated_batch(rng, n=8)[0]
    y_train = bn.train()(x)
    y_eval = bn.eval()(x)
    print("\n3. The same 8 rows in training mode (batch statistics) and eval mode")
    print("   (running statistics), feature 0:\n")
    print("   train:", np.array2string(y_train[:, 0], precision=3, suppress_small=True))
    print("   eval: ", np.array2string(y_eval[:, 0], precision=3, suppress_small=True))
    print(f"   largest difference over all features: {np.abs(y_train - y_eval).max():.3g}")


def _show_gradcheck(rng: np.random.Generator) -> None:
    print("\n4. Analytic gradients against central finite differences (float64):\n")
    x = rng.normal(2.0, 3.0, size=(6, 3, 2))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    dy = rng.normal(size=x.shape)
    running_mean, running_var = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)

    def layer(gamma_: _Array, beta_: _Array, training: bool) -> bnpy.BatchNorm:
        bn = bnpy.BatchNorm(3, dtype=np.float64).train(training)
        bn.gamma, bn.beta = gamma_, beta_
        bn.running_mean, bn.running_var = running_mean, running_var
        return bn

    for training in (True, False):
        bn = layer(gamma, beta, training)
        bn(x)
        analytic = (bn.backward(dy), np.asarray(bn.grad_gamma), np.asarray(bn.grad_beta))

        def forward(x_: _Array, g_: _Array, b_: _Array, training: bool = training) -> _Array:
            return layer(g_, b_, training)(x_)

        numeric = numerical_vjp(forward, (x, gamma, beta), dy)
        errors = [relative_error(a, n) for a, n in zip(analytic, numeric)]
        mode = "train" if training else "eval "
        print(
            f"   {mode}: relative error dx {errors[0]:.1e}, dgamma {errors[1]:.1e}, "
            f"dbeta {errors[2]:.1e}; largest {max(errors):.1e}"
        )


def demo() -> None:
    rng = np.random.default_rng(0)
    print(f"bnpy {bnpy.__version__}: batch normalization with a C core\n")
    _show_normalization(rng)
    bn = _show_running_stats(rng)
    _show_train_vs_eval(rng, bn)
    _show_gradcheck(rng)


# layouts the gradcheck sweep covers: (name, shape, axis)
SWEEP_LAYOUTS = [
    ("(N, C)", (6, 3), 1),
    ("(N, C, L)", (4, 3, 3), 1),
    ("(N, C, H, W)", (3, 2, 2, 3), 1),
    ("(N, C, D, H, W)", (2, 2, 2, 2, 2), 1),
    ("(N, H, W, C) axis=-1", (3, 2, 2, 3), -1),
]


def sweep_gradcheck(
    dtypes: Sequence[type[np.floating[Any]]] = (np.float64, np.float32),
    mode: str = "full",
    seed: int = 0,
) -> Iterator[tuple[str, GradcheckReport]]:
    """Yield (description, report) for every layout, dtype, mode and flag."""
    from bnpy.gradcheck import check_layer

    # not the seed gradcheck draws dy with: x drawn from the same stream would
    # make dy an affine function of x-hat, whose training-mode dx is zero
    rng = np.random.default_rng([seed, 1])
    for name, shape, axis in SWEEP_LAYOUTS:
        channels = shape[axis]
        x = rng.normal(1.0, 2.0, size=shape)
        for dtype in dtypes:
            for training in (True, False):
                for affine in (True, False):
                    bn = bnpy.BatchNorm(channels, affine=affine, axis=axis, dtype=dtype)
                    if affine:
                        bn.gamma, bn.beta = rng.normal(size=channels), rng.normal(size=channels)
                    bn.running_mean = rng.normal(size=channels)
                    bn.running_var = rng.uniform(0.5, 2.0, size=channels)
                    bn.train(training)
                    description = (
                        f"{name:<22} {np.dtype(dtype).name:<8} "
                        f"{'train' if training else 'eval':<6} affine={affine!s:<5}"
                    )
                    yield description, check_layer(bn, x, mode=mode, seed=seed)


def gradcheck_command(fast: bool = False) -> int:
    """python -m bnpy gradcheck [--fast]: one line per case, then a verdict."""
    mode = "fast" if fast else "full"
    print(f"Gradient check of bnpy.BatchNorm (mode={mode}): largest relative error per case\n")
    failed = 0
    cases = len(SWEEP_LAYOUTS) * 2 * 2 * 2  # layouts x dtypes x train/eval x affine
    with Progress(cases, "gradcheck: case") as progress:
        for description, report in sweep_gradcheck(mode=mode):
            verdict = "ok" if report.passed else "FAILED"
            failed += not report.passed
            progress.advance()
            progress.print(f"  {description}  max_rel_error {report.max_rel_error:.1e}  {verdict}")
    print(
        f"\n{'all cases passed' if not failed else f'{failed} case(s) FAILED'} "
        "(float32 cases use eps=1e-3, atol=1e-3, rtol=1e-2: float32 cannot resolve smaller steps)"
    )
    return 1 if failed else 0


# ---- python -m bnpy demo: a deep network with and without BatchNorm --------

DEMO_NETWORK: dict[str, Any] = dict(width=64, depth=20, activation="sigmoid")
DEMO_TRAINING = [  # (learning rate, steps): a short low-rate phase at the end
    (0.3, 500),  # lets the running statistics catch up with the weights
    (0.03, 100),
]
DEMO_BATCH_SIZE = 64


def _demo_networks(seed: int) -> dict[str, nn.Sequential]:
    """The same 20-layer sigmoid network (same weights) without and with BatchNorm."""
    return {
        name: nn.mlp(2, 3, batch_norm=batch_norm, rng=seed, **DEMO_NETWORK)
        for name, batch_norm in (("plain", False), ("BatchNorm", True))
    }


def _measure_at_init(models: Mapping[str, nn.Sequential], x: _Array, labels: _Array) -> _Measured:
    """One forward and backward per model; per-layer pre-activation std and gradient norm."""
    measured = {}
    for name, model in models.items():
        _, dlogits = nn.softmax_cross_entropy(model.forward(x), labels)
        model.backward(dlogits)
        stds = [nn.batch_std(v) for v in nn.preactivations(model)]
        measured[name] = (stds, nn.weight_gradient_norms(model))
    return measured


def _print_init_table(measured: _Measured) -> None:
    (plain_std, plain_grad), (bn_std, bn_grad) = measured["plain"], measured["BatchNorm"]
    print(f"  {'':>5}   {'pre-activation std':^20}   {'weight-gradient norm':^20}")
    print(f"  {'layer':>5}   {'plain':>9} {'BatchNorm':>10}   {'plain':>9} {'BatchNorm':>10}")
    for i in range(len(plain_grad)):
        stds = (
            f"{plain_std[i]:>9.1e} {bn_std[i]:>10.1e}"
            if i < len(plain_std)
            else f"{'-':>9} {'-':>10}"
        )
        print(f"  {i + 1:>5}   {stds}   {plain_grad[i]:>9.1e} {bn_grad[i]:>10.1e}")
    print(
        f"\n  first / last layer's gradient norm: plain {plain_grad[0] / plain_grad[-1]:.1e}, "
        f"BatchNorm {bn_grad[0] / bn_grad[-1]:.2g}"
    )


def _train(
    models: Mapping[str, nn.Sequential], x: _Array, labels: _Array, seed: int
) -> dict[str, _Array]:
    """Train each model with nn.fit over the DEMO_TRAINING phases; return its losses."""
    curves = {}
    steps_per_model = sum(steps for _, steps in DEMO_TRAINING)
    with Progress(len(models) * steps_per_model, "demo: training step") as progress:
        for name, model in models.items():
            phases = [
                nn.fit(
                    model,
                    x,
                    labels,
                    lr=lr,
                    steps=steps,
                    batch_size=DEMO_BATCH_SIZE,
                    rng=[seed, phase],
                    on_step=progress.advance,
                )
                for phase, (lr, steps) in enumerate(DEMO_TRAINING)
            ]
            curves[name] = np.concatenate(phases)
    return curves


def _print_results(
    models: Mapping[str, nn.Sequential],
    curves: Mapping[str, _Array],
    data: Mapping[str, tuple[_Array, _Array]],
) -> dict[str, dict[str, float]]:
    print(f"  {'':<28} {'plain':>9} {'BatchNorm':>10}")
    picks: list[tuple[str, Callable[[_Array], float]]] = [
        ("loss, first step", lambda c: float(c[0])),
        ("loss, mean of last 50 steps", lambda c: float(np.nanmean(c[-50:]))),
    ]
    for what, pick in picks:
        print(f"  {what:<28} {pick(curves['plain']):>9.3f} {pick(curves['BatchNorm']):>10.3f}")
    accuracies = {}
    for split, (x, labels) in data.items():
        row = [nn.accuracy(model.eval().forward(x), labels) for model in models.values()]
        accuracies[split] = dict(zip(models, row))
        print(f"  {split + ' accuracy (eval mode)':<28} {row[0]:>9.1%} {row[1]:>10.1%}")
    return accuracies


def _plot_demo(
    path: str,
    models: Mapping[str, nn.Sequential],
    measured: _Measured,
    curves: Mapping[str, _Array],
    test_data: tuple[_Array, _Array],
    accuracies: Mapping[str, float],
) -> None:
    """Write the demo's panels to path: measurements, losses, both models' decision regions."""
    from matplotlib.figure import Figure

    from bnpy import viz

    fig = Figure(figsize=(18, 10), layout="constrained")
    axes = fig.subplot_mosaic([["std", "grad", "plain"], ["loss", "loss", "BatchNorm"]])
    ax_std, ax_grad, ax_loss = axes["std"], axes["grad"], axes["loss"]
    viz.activation_stds(
        {k: v[0] for k, v in measured.items()},
        ax=ax_std,
        title="At initialization: pre-activation std by layer",
    )
    viz.gradient_norms(
        {k: v[1] for k, v in measured.items()},
        ax=ax_grad,
        title="At initialization: weight-gradient norm by layer",
    )
    viz.loss_curves(
        curves, ax=ax_loss, smooth=20, title="Training loss (moving average over 20 steps)"
    )
    for name, model in models.items():
        viz.decision_regions(
            model,
            *test_data,
            ax=axes[name],
            title=f"{name}: test set, accuracy {accuracies[name]:.1%}",
        )
    fig.suptitle(
        f"A {DEMO_NETWORK['depth']}-layer {DEMO_NETWORK['activation']} network "
        "with and without BatchNorm"
    )
    fig.savefig(path, dpi=100)


def train_demo(plot: str | None = None, seed: int = 0) -> None:
    """python -m bnpy demo: train one deep network with and without BatchNorm."""
    x, labels = spirals(200, rng=seed)
    test_data = spirals(200, rng=seed + 1)
    models = _demo_networks(seed)
    depth = DEMO_NETWORK["depth"]
    print(
        f"bnpy {bnpy.__version__} demo: one {depth}-layer sigmoid network (width "
        f"{DEMO_NETWORK['width']}), trained without and with BatchNorm"
    )
    print(
        f"on 3 interleaved spirals ({len(x)} training and {len(test_data[0])} test "
        "points, bnpy.data.spirals).\n"
    )
    print("1. At initialization, one forward and backward pass over the training set.")
    print("   Pre-activation std: each unit's standard deviation over the batch,")
    print(f"   averaged over the layer's units (layer {depth} gives the logits).\n")
    measured = _measure_at_init(models, x, labels)
    _print_init_table(measured)
    phases = ", then ".join(f"{steps} steps at lr {lr:g}" for lr, steps in DEMO_TRAINING)
    print(f"\n2. Training with SGD, batches of {DEMO_BATCH_SIZE}: {phases}.\n")
    curves = _train(models, x, labels, seed)
    accuracies = _print_results(models, curves, {"train": (x, labels), "test": test_data})
    print(
        "\n   Chance is 33.3%: without BatchNorm the early layers get no gradient"
        "\n   and the network cannot learn; with it, every layer trains."
    )
    if plot:
        _plot_demo(plot, models, measured, curves, test_data, accuracies["test"])
        print(f"\n   figure written to {plot}")


COMMANDS = """commands:
  (no command)         the demonstration: normalization, running statistics,
                       train versus eval, a finite-difference check
  gradcheck [--fast]   check BatchNorm's gradients over layouts, dtypes, modes
  demo [--plot FILE]   train a 20-layer sigmoid network with and without
                       BatchNorm; print per-layer statistics and accuracies
  bench [options]      time bnpy against PyTorch, NumPy and a copy

python -m bnpy COMMAND --help says more about each. The long commands show
their progress on standard error when it is a terminal."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of python -m bnpy and of each of its commands."""
    from bnpy.bench import build_parser as bench_parser

    parser = argparse.ArgumentParser(
        prog="python -m bnpy",
        description="bnpy: batch normalization with a C core.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnpy {bnpy.__version__}")
    commands = parser.add_subparsers(
        dest="command",
        metavar="[command]",
        help="one of the commands below; none: the demonstration",
    )
    gradcheck = commands.add_parser(
        "gradcheck",
        description="Check bnpy.BatchNorm's gradients against finite differences "
        "over layouts, dtypes, train/eval and affine on/off; one line per case.",
    )
    gradcheck.add_argument(
        "--fast",
        action="store_true",
        help="directional derivatives along a few random directions instead of every element",
    )
    demo = commands.add_parser(
        "demo", description="Train a deep sigmoid network with and without BatchNorm."
    )
    demo.add_argument("--plot", metavar="FILE.png", help="also write a figure (needs matplotlib)")
    bench = bench_parser(add_help=False)
    commands.add_parser("bench", parents=[bench], description=bench.description)
    for command in commands.choices.values():  # so that main knows whose usage to show
        command.set_defaults(parser=command)
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused by the command's own parser, so that its usage shows
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        demo()
        return 0
    if args.command == "gradcheck":
        return gradcheck_command(fast=args.fast)
    if args.command == "bench":
        from bnpy.bench import run_command

        return run_command(args, argv[1:])
    # demo
    import importlib.util

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print('--plot needs matplotlib: pip install "bnpy[notebooks]"', file=sys.stderr)
        return 2
    train_demo(plot=args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
