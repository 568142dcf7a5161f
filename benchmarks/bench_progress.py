"""What progress reports from inside the compiled chain cost: the chain with and without them, side by side.

  python benchmarks/bench_progress.py [--model=digits] [--steps=200] [--batch=16] [--repeats=7] [--quick]

Times sampling.sample_loop (jitted) and sampling.sample_sharded (pmapped, this host's devices) each with
progress=None (no callback in the program) and with a progress.Progress's update, the way the CLI runs them (a new
Progress per call, 30 s between lines). The four run once per round, the order reversed every other round; medians
of wall time and of this process's CPU time (all threads): on a shared machine the CPU time is the steadier figure.
The last line is the headline: the larger of the two CPU-time ratios, with-progress ÷ without.
"""
import argparse
import time

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

import flax
import jax
import jax.numpy as jnp

from configs import digits
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import progress
from ddpm_jax import sampling
from ddpm_jax import train_step


def model_and_params(name):
  """(U-Net, params, image shape): the digits demo's U-Net (configs/digits.py), or the tiny one of common.MODELS."""
  config = digits.get_config()
  if name == "tiny":
    fields, size, _ = common.MODELS["tiny"]
    config.model.update(fields)
    config.data.image_size = size
  model = train_step.create_model(config)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + shape), jnp.zeros((1,), jnp.int32))["params"]
  return model, params, shape


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("digits", "tiny"), default="digits")
  parser.add_argument("--steps", type=int, default=200, help="reverse steps per chain (T of a linear schedule)")
  parser.add_argument("--batch", type=int, default=16, help="samples per chain (a multiple of the device count)")
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
  parser.add_argument("--quick", action="store_true", help="the smallest settings (tiny model), for smoke tests")
  args = parser.parse_args()
  if args.quick:
    args.model, args.steps, args.batch, args.repeats = "tiny", 5, jax.local_device_count(), 1
  model, params, image_shape = model_and_params(args.model)
  for line in common.machine_info(threads=0)[:2]:
    print(line)
  print(f"model: {args.model} ({'×'.join(map(str, image_shape))}), batch {args.batch}, {args.steps} steps, "
        f"{jax.local_device_count()} device(s); {args.repeats} rounds\n")

  diffusion = diffusion_lib.GaussianDiffusion(diffusion_lib.get_beta_schedule("linear", num_timesteps=args.steps))
  rng = jax.random.PRNGKey(0)
  shape = (args.batch,) + image_shape

  def reporter():
    return progress.Progress("bench chain", args.steps, "steps").update

  def loop(with_progress):
    # The reporter is an argument of the traced function, not baked in: each call can bring a new Progress.
    sink = [None]
    fn = jax.jit(lambda p, r: sampling.sample_loop(sampling.unet_model_fn(model, p), diffusion, r, shape,
                                                   progress=(lambda d: sink[0](d)) if with_progress else None))
    compiled = fn.lower(params, rng).compile()

    def run():
      sink[0] = reporter()
      compiled(params, rng).block_until_ready()
      jax.effects_barrier()
    return run

  replicated = flax.jax_utils.replicate(params)

  def sharded(with_progress):
    def run():
      sampling.sample_sharded(model, replicated, diffusion, rng, args.batch, image_shape,
                              progress=reporter() if with_progress else None).block_until_ready()
    return run

  fns = dict(loop_off=loop(False), loop_on=loop(True), sharded_off=sharded(False), sharded_on=sharded(True))
  for fn in fns.values():
    fn()  # compiles (the jitted pair already is) and warms up
  cpu = {name: [] for name in fns}

  def with_cpu_time(name):
    def run():
      t0 = time.process_time()
      fns[name]()
      cpu[name].append(time.process_time() - t0)
    return run
  wall = common.alternate({name: with_cpu_time(name) for name in fns}, args.repeats)
  rows, cpu_ratios = [], []
  for kind, label in (("loop", "sample_loop (jit)"), ("sharded", "sample_sharded (pmap)")):
    for clock, times in (("wall", wall), ("CPU", cpu)):
      off, on = times[f"{kind}_off"], times[f"{kind}_on"]
      ratio = common.median(on) / common.median(off)
      rows.append([label, clock, f"{common.median(off):.3f}", common.spread(off), f"{common.median(on):.3f}",
                   common.spread(on), f"**{ratio:.4f}**" if clock == "CPU" else f"{ratio:.4f}"])
      if clock == "CPU":
        cpu_ratios.append(ratio)
  common.print_table(["chain", "clock", "without progress s (median)", "min–max", "with progress s (median)",
                      "min–max", "with ÷ without"], rows)
  print(f"\nReports per chain: {len(range(0, args.steps, progress.loop_every(args.steps)))} "
        f"(every {progress.loop_every(args.steps)} steps).")
  print(f"progress overhead (CPU time): with ÷ without = {max(cpu_ratios):.4f} (target ≤ 1.02)")


if __name__ == "__main__":
  main()
