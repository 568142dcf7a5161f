"""The reverse chain: our one-`lax.scan` sampler against its own forward pass and against diffusers' DDPMPipeline.

  python benchmarks/bench_sample.py [--steps=100] [--batch=8] [--repeats=3] [--forwards=10] [--threads=N] [--quick]

Reports (a) our chain's time ÷ (steps × one jitted forward at the same batch): what the scan costs beyond the
network, and (b) images/s of ours against DDPMPipeline with the same weights (converted from the diffusers model)
and the same number of network calls. With --steps=S < 1000 both use a T = S linear schedule from 1e-4 to 0.02, so
each makes S calls; the paper's chain is --steps=1000. Each round runs our chain, the pipeline, and --forwards single
forwards of each framework, the order reversed every other round; medians. On a CPU, our chain and forward also
run compiled with XLA's own choice of YNNPACK ops instead of ddpm_jax/xla_cpu.py's, side by side. The last line is
the headline, ours compiled as main.py compiles the model (the flag for small models only, ddpm_jax/xla_cpu.py).
"""
import argparse

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

import jax
import numpy as np
import torch

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.sampler import Sampler


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--steps", type=int, default=100, help="network calls per chain (the paper: 1000)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
  parser.add_argument("--forwards", type=int, default=10, help="single forwards of each framework per round")
  args = parser.parse_args()
  if args.quick:
    args.model, args.steps, args.batch, args.repeats, args.forwards = "tiny", 5, 2, 1, 2
  torch.set_num_threads(args.threads)
  ours, params, theirs, size = common.matched_models(args.model)
  channels = common.MODELS[args.model][2]
  shape = (args.batch, size, size, channels)
  for line in common.machine_info(args.threads):
    print(line)
  print(f"model: {args.model} ({size}×{size}×{channels}), batch {args.batch}, {args.steps} steps; "
        f"{args.repeats} rounds\n")

  diffusion = diffusion_lib.GaussianDiffusion(diffusion_lib.get_beta_schedule("linear", num_timesteps=args.steps))
  chain, compile_s = common.ours_chain(ours, params, diffusion, shape, Sampler())  # the paper's chain, all T steps
  x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)  # a chain's x_T-like input, at t = 500
  forward, forward_pt = common.ours_forward(ours, params, x), common.torch_forward(theirs, x)
  pipe, _ = common.diffusers_chain(theirs, common.ddpm_scheduler(args.steps), args.steps, args.batch)
  forward()
  forward_pt()

  def forwards(fn):
    return lambda: [fn() for _ in range(args.forwards)]
  fns = dict(ours=chain, diffusers=pipe, forward=forwards(forward), forward_pt=forwards(forward_pt))
  if jax.default_backend() == "cpu":
    fns["ours_xla"], _ = common.ours_chain(ours, params, diffusion, shape, Sampler(), common.XLA_DEFAULT_OPTIONS)
    fns["forward_xla"] = forwards(common.ours_forward(ours, params, x, compiler_options=common.XLA_DEFAULT_OPTIONS))
  times = common.alternate(fns, args.repeats)
  med = {k: common.median(v) for k, v in times.items()}
  fwd, fwd_pt = med["forward"] / args.forwards, med["forward_pt"] / args.forwards
  overhead, overhead_pt = med["ours"] / (args.steps * fwd), med["diffusers"] / (args.steps * fwd_pt)
  main_key = common.main_py_key(args.model, med)  # the headline
  speedup = med["diffusers"] / med[main_key]
  rows = [["ddpm-jax (lax.scan)", f"{med['ours']:.2f}", common.spread(times["ours"]),
           f"{args.batch / med['ours']:.3f}", f"{fwd:.4f}", f"**{overhead:.3f}**"]]
  if "ours_xla" in med:
    fwd_xla = med["forward_xla"] / args.forwards
    rows.append(["ddpm-jax, XLA's YNNPACK default", f"{med['ours_xla']:.2f}", common.spread(times["ours_xla"]),
                 f"{args.batch / med['ours_xla']:.3f}", f"{fwd_xla:.4f}",
                 f"{med['ours_xla'] / (args.steps * fwd_xla):.3f}"])
  rows.append(["diffusers DDPMPipeline", f"{med['diffusers']:.2f}", common.spread(times["diffusers"]),
               f"{args.batch / med['diffusers']:.3f}", f"{fwd_pt:.4f}", f"{overhead_pt:.3f}"])
  one_forward = dict(ours=fwd, ours_xla=med.get("forward_xla", 0) / args.forwards)
  for key, name in (("ours", "ours ÷ diffusers (images/s)"), ("ours_xla", "ours with XLA's default ÷ diffusers")):
    if key in med:
      r = f"{med['diffusers'] / med[key]:.2f}"
      rows.append([name + (" (main.py's)" if key == main_key else ""), "", "", f"**{r}**" if key == main_key else r,
                   f"{fwd_pt / one_forward[key]:.2f} (theirs ÷ ours)", ""])
  common.print_table(["framework", "chain s (median)", "min–max", "images/s", "one forward s",
                      "chain ÷ (steps × forward)"], rows)
  print(f"\nCompile of our chain: {compile_s:.1f} s (not in the chain times).")
  print(f"chain ÷ (steps × forward) = {overhead:.3f} (target ≤ 1.03); sampling throughput ours ÷ DDPMPipeline = "
        f"{speedup:.2f} (target ≥ 1.0; long-run goal ≥ 1.5)")


if __name__ == "__main__":
  main()
