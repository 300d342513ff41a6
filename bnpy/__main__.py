"""python -m bnpy: a short demonstration of what batch normalization does."""
import sys

import numpy as np

import bnpy
from bnpy.gradcheck import numerical_vjp, relative_error


def _generated_batch(rng, n=256):
    """(n, 4) float32 values whose features live on very different scales."""
    means = np.array([5.0, -3.0, 100.0, 0.01])
    stds = np.array([2.0, 0.5, 30.0, 0.05])
    return (rng.normal(size=(n, 4)) * stds + means).astype(np.float32), means, stds


def _show_normalization(rng):
    x, _, _ = _generated_batch(rng)
    bn = bnpy.BatchNorm(4)
    y = bn(x)
    print("1. One training-mode forward on a (256, 4) batch: every feature comes out")
    print("   with mean 0 and standard deviation 1, whatever its scale going in.\n")
    print(f"   {'feature':>7} {'mean in':>10} {'std in':>10} {'mean out':>10} {'std out':>9}")
    for c in range(4):
        print(f"   {c:>7} {x[:, c].mean():>10.4g} {x[:, c].std():>10.4g} "
              f"{y[:, c].mean():>10.2e} {y[:, c].std():>9.5f}")
    print("   (a std out just under 1 is eps at work: sqrt(var / (var + eps)), eps = 1e-5)")


def _show_running_stats(rng):
    _, means, stds = _generated_batch(rng)
    bn = bnpy.BatchNorm(4, momentum=0.1)
    for _ in range(100):
        bn(_generated_batch(rng)[0])
    print("\n2. Running statistics after 100 training steps (momentum=0.1),")
    print("   against the distribution the batches were drawn from:\n")
    print(f"   {'feature':>7} {'running mean':>13} {'true mean':>10} "
          f"{'running var':>12} {'true var':>10}")
    for c in range(4):
        print(f"   {c:>7} {bn.running_mean[c]:>13.4g} {means[c]:>10.4g} "
              f"{bn.running_var[c]:>12.4g} {stds[c] ** 2:>10.4g}")
    return bn


def _show_train_vs_eval(rng, bn):
    x = _generated_batch(rng, n=8)[0]
    y_train = bn.train()(x)
    y_eval = bn.eval()(x)
    print("\n3. The same 8 rows in training mode (batch statistics) and eval mode")
    print("   (running statistics), feature 0:\n")
    print("   train:", np.array2string(y_train[:, 0], precision=3, suppress_small=True))
    print("   eval: ", np.array2string(y_eval[:, 0], precision=3, suppress_small=True))
    print(f"   largest difference over all features: {np.abs(y_train - y_eval).max():.3g}")


def _show_gradcheck(rng):
    print("\n4. Analytic gradients against central finite differences (float64):\n")
    x = rng.normal(2.0, 3.0, size=(6, 3, 2))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    dy = rng.normal(size=x.shape)
    running_mean, running_var = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)

    def layer(gamma_, beta_, training):
        bn = bnpy.BatchNorm(3, dtype=np.float64).train(training)
        bn.gamma, bn.beta = gamma_, beta_
        bn.running_mean, bn.running_var = running_mean, running_var
        return bn

    for training in (True, False):
        bn = layer(gamma, beta, training)
        bn(x)
        analytic = (bn.backward(dy), bn.grad_gamma, bn.grad_beta)
        numeric = numerical_vjp(lambda x_, g_, b_: layer(g_, b_, training)(x_),
                                (x, gamma, beta), dy)
        errors = [relative_error(a, n) for a, n in zip(analytic, numeric)]
        mode = "train" if training else "eval "
        print(f"   {mode}: relative error dx {errors[0]:.1e}, dgamma {errors[1]:.1e}, "
              f"dbeta {errors[2]:.1e}; largest {max(errors):.1e}")


def demo():
    rng = np.random.default_rng(0)
    print(f"bnpy {bnpy.__version__}: batch normalization with a C core\n")
    _show_normalization(rng)
    bn = _show_running_stats(rng)
    _show_train_vs_eval(rng, bn)
    _show_gradcheck(rng)


def main(argv):
    if argv and argv[0] not in ("-h", "--help"):
        print(f"unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    if argv:
        print("usage: python -m bnpy    run the demonstration")
        return 0
    demo()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
