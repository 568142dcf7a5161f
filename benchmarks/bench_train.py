"""Train step of the CIFAR-10 U-Net: ddpm-jax's own pmapped step against diffusers' UNet2DModel + torch Adam.

  python benchmarks/bench_train.py [--batch 8 32] [--repeats=5] [--warmup=2] [--threads=N] [--remat] [--quick]
  python benchmarks/bench_train.py --model digits --batch 64   # the offline demo's U-Net and step (configs/digits.py)
  python benchmarks/bench_train.py --conv_impl xla   # XLA's own convolution gradients (default 'auto': conv3x3's)

Both sides start from the same weights and do the same work per step: draw t and ε, q_sample, forward with dropout
0.1, MSE on ε, backward, clip to global norm 1, Adam, EMA. Ours is `train_step.pmapped_train_steps`, the step training
runs, on one device; theirs is the usual PyTorch loop (manual EMA with torch._foreach_lerp_). Runs alternate, one of
each per round (plus a float32 matmul that measures this CPU's practical peak, and on a CPU our step compiled with
XLA's own choice of YNNPACK ops instead of ddpm_jax/xla_cpu.py's); medians after the warm-up. FLOPs
per step are XLA's cost analysis of our compiled step; both frameworks are credited with the same FLOPs.
The last line is the headline: diffusers' step time ÷ ours at each batch size (> 1: ours is faster), ours compiled
as main.py compiles the model (the flag for small models only, ddpm_jax/xla_cpu.py).
"""
import argparse

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

import jax
import numpy as np
import torch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes, e.g. --batch 8 32")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one step of each framework per round)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first step")
  parser.add_argument("--remat", action="store_true", help="our U-Net with remat=True")
  parser.add_argument("--dtype", default="float32", help="our U-Net's activation dtype")
  parser.add_argument("--conv_impl", default="auto", choices=("auto", "xla"), help="our U-Net's conv_impl")
  args = parser.parse_args()
  if args.quick:
    args.model, args.batch, args.repeats, args.warmup = "tiny", [2], 1, 0
  torch.set_num_threads(args.threads)
  config = common.train_config(args.model)
  ours, params, theirs, size = common.matched_models(args.model, dropout=config.model.dropout, remat=args.remat,
                                                     dtype=jax.numpy.dtype(args.dtype), conv_impl=args.conv_impl)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  matmul, matmul_flops = common.matmul_peak_fn()
  for line in common.machine_info(args.threads):
    print(line)
  channels = common.MODELS[args.model][2]
  print(f"model: {args.model} ({n_params:,} params, {size}×{size}×{channels}), remat={args.remat}, "
        f"dtype={args.dtype}, conv_impl={args.conv_impl}; {args.repeats} timed rounds after {args.warmup} warm-up\n")

  rows, ratios = [], []
  for b in args.batch:
    batch_np = common.random_batch(args.model, b)
    step_ours, compile_s, first_ours, flops = common.ours_train_step(ours, params, config, batch_np)
    step_pt, first_pt = common.torch_train_step(theirs, config, batch_np)
    fns = dict(ours=step_ours, diffusers=step_pt, matmul=matmul)
    if jax.default_backend() == "cpu":  # the same step with XLA's own choice of YNNPACK ops, side by side
      fns["ours_xla"], compile_xla, first_xla, _ = common.ours_train_step(ours, params, config, batch_np,
                                                                          common.XLA_DEFAULT_OPTIONS)
    common.alternate(fns, args.warmup)
    times = common.alternate(fns, args.repeats)
    med = {k: common.median(v) for k, v in times.items()}
    peak = matmul_flops / med["matmul"] / 1e9
    names = [("ours", "ddpm-jax", f"{compile_s:.1f} + {first_ours:.2f}")]
    if "ours_xla" in fns:
      names.append(("ours_xla", "ddpm-jax, XLA's YNNPACK default", f"{compile_xla:.1f} + {first_xla:.2f}"))
    for key, name, first in names + [("diffusers", "diffusers", f"{first_pt:.2f}")]:
      gflops = flops / med[key] / 1e9
      rows.append([b, name, f"{med[key]:.3f}", common.spread(times[key]), f"{gflops:.0f}", f"{gflops / peak:.0%}",
                   first])
    main_key = common.main_py_key(args.model, fns)  # the headline
    ratio = med["diffusers"] / med[main_key]
    ratios.append((b, ratio))
    for key, name in (("ours", "diffusers ÷ ours"), ("ours_xla", "diffusers ÷ ours with XLA's default")):
      if key in fns:
        shown = f"**{med['diffusers'] / med[key]:.2f}**" if key == main_key else f"{med['diffusers'] / med[key]:.2f}"
        rows.append([b, name + (" (main.py's)" if key == main_key else ""), shown, "",
                     f"{flops / 1e9:.1f} GFLOP/step" if key == "ours" else "",
                     f"peak {peak:.0f} GFLOP/s" if key == "ours" else "", ""])
    del step_ours, step_pt, fns
  common.print_table(["batch", "framework", "s/step (median)", "min–max", "GFLOP/s", "of matmul peak",
                      "first step s (compile + run)"], rows)
  print("\nGFLOP/s: XLA's FLOP count of our step ÷ each median; matmul peak: float32 2048³ jnp.dot, same rounds.")
  print("train step diffusers ÷ ours: " + ", ".join(f"{r:.2f} at batch {b}" for b, r in ratios) +
        " (target ≥ 1.0; long-run goal ≥ 1.3)")


if __name__ == "__main__":
  main()
