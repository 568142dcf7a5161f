"""Two attempts, kept reproducible: a 3×3 convolution's weight gradient as XLA compiles it against matmul forms.

  python benchmarks/bench_conv_grad.py [--repeats=7] [--quick]

The hypothesis (docs/performance.md): XLA:CPU computes dW as a convolution whose contracted feature dimension is the
batch (8 at batch 8) and whose window is the whole image, a shape its kernels run slowly; written as
dW[i, j] = Σ_{n,h,w} x_pad[n, h+i, w+j, :]ᵀ g[n, h, w, :], nine matmuls that contract over N·H·W, it would be faster (that form now lives in ddpm_jax/models/conv3x3.py, with
the Winograd one that bench_conv_impl.py times). The second form (im2col) gathers the nine shifted copies into one [N·H·W, 9·in] patch matrix and does one matmul
with a 9× larger output.
All forms are checked to agree, then timed alternately in one process (medians). The last line is the headline:
XLA's time ÷ the nine matmuls' time at each shape (> 1: the matmul form is faster).
"""
import argparse

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import conv3x3

# (batch, side, in channels, out channels): the CIFAR-10 U-Net's 3×3 convolutions at batch 8 and 32.
SHAPES = ((8, 32, 128, 128), (8, 16, 256, 256), (8, 8, 256, 256), (32, 32, 128, 128))


def weight_grad_im2col(x, w, g):
  del w
  dw = jnp.dot(conv3x3.im2col_patches(x).T, g.reshape(-1, g.shape[-1]))  # [9·in, out], (i, j, in) order
  return dw.reshape(3, 3, x.shape[-1], -1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="one small shape, 3 rounds (a smoke test)")
  args = parser.parse_args()
  shapes = ((2, 8, 16, 16),) if args.quick else SHAPES
  repeats = 3 if args.quick else args.repeats
  for line in common.machine_info(threads=0)[:2]:
    print(line)
  fns = dict(xla=jax.jit(conv3x3.weight_grad_xla), matmuls=jax.jit(conv3x3.weight_grad_matmuls),
             im2col=jax.jit(weight_grad_im2col))
  rows, ratios = [], []
  for b, side, cin, cout in shapes:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (b, side, side, cin))
    w = jax.random.normal(keys[1], (3, 3, cin, cout))
    g = jax.random.normal(keys[2], (b, side, side, cout))
    want = fns["xla"](x, w, g)
    for name in ("matmuls", "im2col"):
      np.testing.assert_allclose(fns[name](x, w, g), want, rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()),
                                 err_msg=name)
    times = common.alternate({k: (lambda f=f: jax.block_until_ready(f(x, w, g))) for k, f in fns.items()}, repeats)
    med = {k: common.median(v) for k, v in times.items()}
    flops = 2 * b * side * side * cin * cout * 9
    ratio = med["xla"] / med["matmuls"]
    ratios.append(f"{ratio:.2f} at {b}×{side}²×{cin}→{cout}")
    rows.append([f"{b}×{side}²×{cin}→{cout}", f"{med['xla'] * 1e3:.1f}", f"{flops / med['xla'] / 1e9:.0f}",
                 f"{med['matmuls'] * 1e3:.1f}", f"{flops / med['matmuls'] / 1e9:.0f}", f"{ratio:.2f}",
                 f"{med['im2col'] * 1e3:.1f}", f"{med['xla'] / med['im2col']:.2f}"])
  common.print_table(["shape (batch×side²×in→out)", "XLA ms", "GFLOP/s", "9 matmuls ms", "GFLOP/s",
                      "XLA ÷ matmuls", "im2col ms", "XLA ÷ im2col"], rows)
  print("\nweight gradient, XLA ÷ 9 matmuls: " + ", ".join(ratios))


if __name__ == "__main__":
  main()
