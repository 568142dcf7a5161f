"""model.conv_impl: XLA's 3×3 convolution against ddpm_jax.models.conv3x3, per convolution and per train step.

  python benchmarks/bench_conv_impl.py [--repeats=5] [--quick]
  python benchmarks/bench_conv_impl.py --shapes 64x16x96x32 64x8x64x64   # batch x side x in x out, instead of SHAPES
  python benchmarks/bench_conv_impl.py --train_step cifar10 --batch 8 [--repeats=3]   # conv_impl 'xla' vs 'auto'

Per convolution (the default): at each shape of the CIFAR-10 U-Net's 3×3 convolutions at batch 8 and 32 and of the
digits demo's at batch 64, it times forward + both gradients with XLA's convolution and with conv3x3.conv in the
forms conv3x3.choose picks, then each gradient form alone (input: xla, winograd, matmuls; weight: the same three).
Every form is first checked against XLA's vjp. All of a shape's variants run alternately, one call of each per round,
in one process; the cells are medians, the ratios XLA's time ÷ the variant's (> 1: the variant is faster). The last
line is the headline: forward + both gradients, XLA ÷ conv3x3 at each shape.

--train_step: the whole train step (training's own pmapped step, one device) of the U-Net with conv_impl 'xla' and
with 'auto', from the same params, alternating; the last line is the ratio 'xla' ÷ 'auto'.
"""
import argparse

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import conv3x3

# (batch, side, in channels, out channels): the CIFAR-10 U-Net's 3×3 convolutions at batch 8 and 32 (levels 32², 16²,
# 8², 4² with 128, 256, 256, 256 channels), and the digits demo's (configs/digits.py: ch 32, ch_mult (1, 2, 2), 8×8
# images: levels 8², 4², 2² with 32, 64, 64 channels) at its batch 64.
SHAPES = ((8, 32, 128, 128), (8, 16, 256, 256), (8, 8, 256, 256), (8, 4, 256, 256), (32, 32, 128, 128),
          (32, 16, 256, 256), (64, 8, 32, 32), (64, 4, 64, 64), (64, 2, 64, 64))
QUICK_SHAPES = ((2, 8, 16, 16),)


def _shape(text):
  """'64x16x96x32' → (64, 16, 96, 32): batch, side, in channels, out channels."""
  parts = text.lower().split("x")
  if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f"{text!r}: expected batch x side x in x out, e.g. 64x16x96x32")
  return tuple(int(p) for p in parts)


def _shape_name(b, side, cin, cout):
  return f"{b}×{side}²×{cin}→{cout}"


def _forward_and_grads(conv):
  """jit of (x, w, g) ↦ (y, dx, dw) for conv(x, w)."""
  def run(x, w, g):
    y, pullback = jax.vjp(conv, x, w)
    return (y,) + pullback(g)
  return jax.jit(run)


def time_shape(b, side, cin, cout, repeats):
  """{variant: median seconds} at one shape, every variant checked against XLA first."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (b, side, side, cin))
  w = jax.random.normal(keys[1], (3, 3, cin, cout))
  g = jax.random.normal(keys[2], (b, side, side, cout))
  fns = {"all: xla": _forward_and_grads(conv3x3.xla_conv), "all: conv3x3": _forward_and_grads(conv3x3.conv)}
  fns.update({f"dx: {form}": jax.jit(f) for form, f in conv3x3.INPUT_GRADS.items()})
  fns.update({f"dw: {form}": jax.jit(f) for form, f in conv3x3.WEIGHT_GRADS.items()})
  want = dict(zip(("y", "dx", "dw"), fns["all: xla"](x, w, g)))
  for name, f in fns.items():
    got = f(x, w, g)
    pairs = zip(("y", "dx", "dw"), got) if name.startswith("all") else [(name[:2], got)]
    for what, value in pairs:
      scale = float(jnp.abs(want[what]).max())
      np.testing.assert_allclose(value, want[what], rtol=0, atol=1e-5 * scale, err_msg=f"{name} {what}")
  times = common.alternate({k: (lambda f=f: jax.block_until_ready(f(x, w, g))) for k, f in fns.items()}, repeats)
  return {k: common.median(v) for k, v in times.items()}


def conv_table(shapes, repeats):
  rows, headline = [], []
  for b, side, cin, cout in shapes:
    med = time_shape(b, side, cin, cout, repeats)
    forms = conv3x3.choose(b, side, cin, cout)
    ratio = lambda k, base: f"{med[base] / med[k]:.2f}"
    rows.append([_shape_name(b, side, cin, cout), f"{med['all: xla'] * 1e3:.1f}",
                 f"{med['all: conv3x3'] * 1e3:.1f}", f"{forms[0]}, {forms[1]}", ratio("all: conv3x3", "all: xla")]
                + [f"{med[f'dx: {f}'] * 1e3:.1f}" + ("" if f == "xla" else f" ({ratio(f'dx: {f}', 'dx: xla')})")
                   for f in conv3x3.FORMS]
                + [f"{med[f'dw: {f}'] * 1e3:.1f}" + ("" if f == "xla" else f" ({ratio(f'dw: {f}', 'dw: xla')})")
                   for f in conv3x3.FORMS])
    headline.append(f"{ratio('all: conv3x3', 'all: xla')} at {_shape_name(b, side, cin, cout)}")
  common.print_table(["shape (batch×side²×in→out)", "fwd+grads XLA ms", "conv3x3 ms", "rule (dx, dw)", "XLA ÷ conv3x3"]
                     + [f"dx {f} ms" + ("" if f == "xla" else " (XLA ÷)") for f in conv3x3.FORMS]
                     + [f"dw {f} ms" + ("" if f == "xla" else " (XLA ÷)") for f in conv3x3.FORMS], rows)
  print(f"\nmedians of {repeats} alternating rounds.")
  print("forward + both gradients, XLA ÷ conv3x3: " + ", ".join(headline))


def train_step_table(model_name, batches, repeats, warmup):
  """The train step with conv_impl 'xla' and 'auto', the same params, alternating."""
  config = common.train_config(model_name)
  models = {impl: common.matched_models(model_name, dropout=config.model.dropout, conv_impl=impl)
            for impl in ("xla", "auto")}
  params = models["xla"][1]  # one init for both: the params do not depend on conv_impl
  rows, ratios = [], []
  for b in batches:
    batch_np = common.random_batch(model_name, b)
    steps, compile_s = {}, {}
    for impl in ("xla", "auto"):
      steps[impl], compile_s[impl], _, _ = common.ours_train_step(models[impl][0], params, config, batch_np,
                                                                  common.main_py_options(model_name))
    common.alternate(steps, warmup)
    times = common.alternate(steps, repeats)
    med = {k: common.median(v) for k, v in times.items()}
    for impl in ("xla", "auto"):
      rows.append([b, impl, f"{med[impl]:.3f}", common.spread(times[impl]), f"{compile_s[impl]:.1f}"])
    ratios.append(f"{med['xla'] / med['auto']:.2f} at batch {b}")
    del steps
  common.print_table(["batch", "conv_impl", "s/step (median)", "min–max", "compile s"], rows)
  print(f"\nmedians of {repeats} alternating rounds after {warmup} warm-up.")
  print(f"train step ({model_name}), conv_impl 'xla' ÷ 'auto': " + ", ".join(ratios))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1, help="--train_step: untimed rounds after the first step")
  parser.add_argument("--train_step", choices=sorted(common.MODELS), help="time the whole train step of this model")
  parser.add_argument("--batch", type=int, nargs="+", default=[8], help="--train_step: batch sizes")
  parser.add_argument("--quick", action="store_true", help="one small shape (or the tiny model at batch 2), 3 rounds")
  parser.add_argument("--shapes", nargs="+", type=_shape, help="per convolution: these shapes instead of SHAPES, "
                      "each batch x side x in x out, e.g. 64x16x96x32")
  args = parser.parse_args()
  for line in common.machine_info(threads=0)[:2]:
    print(line)
  print()
  if args.train_step:
    model_name, batches = ("tiny", [2]) if args.quick else (args.train_step, args.batch)
    train_step_table(model_name, batches, 3 if args.quick else args.repeats, 0 if args.quick else args.warmup)
  else:
    conv_table(QUICK_SHAPES if args.quick else args.shapes or SHAPES, 3 if args.quick else args.repeats)


if __name__ == "__main__":
  main()
