"""One accelerator, ddpm-jax against PyTorch/diffusers: the CIFAR-10 train step in float32 and bfloat16, two samplers.

  bash benchmarks/accelerator.sh [--no-install] [--tiny]   # installs jax[cuda12] or jax[tpu], torch; then runs this
  python benchmarks/bench_accelerator.py [--batch=128] [--sample-batch=64] [--repeats=5] [--tiny]

On one GPU or one TPU core, in ≤ 8 minutes (an A100/H100-class GPU or a TPU v3; on smaller GPUs pass a smaller
--sample-batch), side by side in one process:
- train steps/s at --batch with float32 and bfloat16 activations (our U-Net's dtype; PyTorch: torch.autocast), each
  with its FLOP utilisation: XLA's FLOP count of our compiled step (both frameworks are credited with it) ÷ the
  step time ÷ the peak of a large matmul of that dtype, measured in the same rounds;
- images/s of the paper's 1000-step ancestral chain (ours: one lax.scan; theirs: DDPMPipeline with DDPMScheduler)
  and of 20-step DPM-Solver++ 2M (theirs: DPMSolverMultistepScheduler, log-SNR steps like ours);
- compile times (PyTorch compiles nothing: its first call stands next to them).
PyTorch runs on CUDA when JAX runs on a GPU and on the CPU when JAX does; next to a TPU it has no device here (no
torch_xla), and its cells read n/a. Rounds alternate the frameworks (common.alternate); medians. The output ends in a
Markdown summary table (ours, PyTorch, ours ÷ PyTorch) and a line naming the device and the run's wall time.
--tiny: the tiny model on the CPU at batch 2, chains of 10 and 4 steps, one round: every code path, in seconds.
"""
import argparse
import math
import os
import time

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

import diffusers
import jax
import jax.numpy as jnp
import torch

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.sampler import Sampler


def fmt(x):
  """x to 3 significant digits without an exponent (the summary's cells are parsed as plain numbers)."""
  return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}" if x else "0"


def repeat(fn, k):
  return lambda: [fn() for _ in range(k)]


def train_figures(args, config, ours, params, theirs, torch_device, dtype):
  """{figure: (ours, PyTorch or None)} of the train step with activations of `dtype`."""
  batch_np = common.random_batch(args.model, args.batch)
  step, compile_s, first_s, flops = common.ours_train_step(ours.clone(dtype=jnp.dtype(dtype)), params, config,
                                                           batch_np, common.main_py_options(args.model))
  fns = dict(ours=repeat(step, args.steps_per_round))
  if torch_device:
    autocast = None if dtype == "float32" else getattr(torch, dtype)
    step_pt, first_pt = common.torch_train_step(theirs, config, batch_np, torch_device, autocast)
    fns["pytorch"] = repeat(step_pt, args.steps_per_round)
  fns["matmul"], matmul_flops = common.matmul_peak_fn(*args.matmul, dtype=dtype)
  common.alternate(fns, args.warmup)
  times = common.alternate(fns, args.repeats)
  rate = {k: args.steps_per_round / common.median(v) for k, v in times.items()}  # steps/s; matmul: fns/s
  peak = matmul_flops * rate["matmul"]
  print(f"train step, {dtype}: {flops / 1e12:.4g} TFLOP/step (XLA), matmul peak {peak / 1e12:.4g} TFLOP/s; "
        f"ddpm-jax {fmt(rate['ours'])} steps/s (compile {compile_s:.1f} s, first step {first_s:.2f} s)"
        + (f", PyTorch {fmt(rate['pytorch'])} steps/s (first step {first_pt:.2f} s)" if torch_device else ""))
  ours_rate, pt_rate = rate["ours"], rate.get("pytorch")
  utilisation = lambda steps_s: 100 * flops * steps_s / peak
  return {f"train steps/s, batch {args.batch}, {dtype}": (ours_rate, pt_rate),
          f"FLOP utilisation, {dtype} (% of the matmul peak)": (
              utilisation(ours_rate), pt_rate and utilisation(pt_rate)),
          f"compile s (PyTorch: first step), train {dtype}": (compile_s, first_pt if torch_device else None)}


def sampler_figures(args, config, ours, params, theirs, torch_device):
  """{figure: (ours, PyTorch or None)} of the ancestral chain and of DPM-Solver++ at --sample-batch."""
  d = config.diffusion
  diffusion = diffusion_lib.GaussianDiffusion.from_config(d)
  _, size, channels = common.MODELS[args.model]
  shape = (args.sample_batch, size, size, channels)
  solver = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end, beta_schedule="linear",
      algorithm_type="dpmsolver++", solver_order=2, use_lu_lambdas=True)  # log-SNR steps, as ours ('auto')
  # label → (our sampler, their scheduler, network calls, timed runs); diffusers' solvers do not clip x̂0. The
  # 1000-step chain runs once per framework by default: long enough to time, and the budget is 8 minutes.
  runs = {
      f"{args.chain_steps}-step ancestral chain": (
          Sampler(num_steps=0 if args.chain_steps == d.num_timesteps else args.chain_steps),
          common.ddpm_scheduler(d.num_timesteps), args.chain_steps, args.sample_repeats),
      f"{args.solver_steps}-step DPM-Solver++": (
          Sampler(method="dpm_solver++", num_steps=args.solver_steps, order=2, clip_denoised=False), solver,
          args.solver_steps, args.repeats)}
  figures = {}
  for label, (sampler, scheduler, steps, repeats) in runs.items():
    chain, compile_s = common.ours_chain(ours, params, diffusion, shape, sampler, common.main_py_options(args.model))
    fns = dict(ours=chain)
    if torch_device:
      fns["pytorch"], first_pt = common.diffusers_chain(theirs, scheduler, steps, args.sample_batch, torch_device)
    times = common.alternate(fns, repeats)
    rate = {k: args.sample_batch / common.median(v) for k, v in times.items()}
    print(f"{label}, batch {args.sample_batch}: ddpm-jax {fmt(rate['ours'])} images/s (compile {compile_s:.1f} s)"
          + (f", PyTorch {fmt(rate['pytorch'])} images/s (first 2-step call {first_pt:.2f} s)" if torch_device
             else ""))
    figures[f"images/s, {label}, batch {args.sample_batch}"] = (rate["ours"], rate.get("pytorch"))
    figures[f"compile s (PyTorch: first call), {label}"] = (compile_s, first_pt if torch_device else None)
  return figures


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--batch", type=int, default=128, help="train batch (the paper's CIFAR-10 batch: 128)")
  parser.add_argument("--sample-batch", type=int, default=64, help="images per chain")
  parser.add_argument("--chain-steps", type=int, default=1000, help="network calls of the ancestral chain")
  parser.add_argument("--solver-steps", type=int, default=20, help="network calls of DPM-Solver++")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the train steps and of the solver")
  parser.add_argument("--sample-repeats", type=int, default=1, help="timed runs of the ancestral chain")
  parser.add_argument("--steps-per-round", type=int, default=5, help="train steps of each framework per round")
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of train steps after the first")
  parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, batch 2: a smoke test")
  args = parser.parse_args()
  if args.tiny or args.quick:
    args.model, args.batch, args.sample_batch, args.chain_steps, args.solver_steps = "tiny", 2, 2, 10, 4
    args.repeats = args.sample_repeats = args.steps_per_round = 1
    args.warmup = 0
    jax.config.update("jax_platforms", "cpu")
  # JAX would take 75% of the GPU's memory at its first use, leaving PyTorch too little for batch 128.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  t_start = time.perf_counter()
  device = jax.devices()[0]
  # The matmul peak's n and calls: ≥ 1 TFLOP a call on an accelerator, long enough to time; small on a CPU.
  args.matmul = (256, 4) if args.tiny or args.quick else (2048, 4) if device.platform == "cpu" else (8192, 8)
  torch_device = {"cpu": "cpu", "gpu": "cuda" if torch.cuda.is_available() else None}.get(device.platform)
  torch.set_num_threads(args.threads)
  if torch_device == "cuda":
    torch.backends.cudnn.benchmark = True  # fastest conv algorithms, as a tuned PyTorch run sets
    torch.set_float32_matmul_precision("high")  # TF32 matmuls, as XLA's default precision takes on GPUs
  torch_name = {"cuda": torch.cuda.get_device_name(0) if torch_device == "cuda" else "", "cpu": "the CPU",
                None: "n/a (no CUDA device for torch here)"}[torch_device]
  device_name = f"{device.device_kind} ({device.platform})"

  for line in common.machine_info(args.threads):
    print(line)
  print(f"device: {device_name}, 1 of {jax.device_count()} used; PyTorch on {torch_name}")
  config = common.train_config(args.model)
  ours, params, theirs, size = common.matched_models(args.model, dropout=config.model.dropout)
  print(f"model: {args.model} ({size}×{size}×{common.MODELS[args.model][2]}), train batch {args.batch} (timed "
        f"rounds: {args.repeats} of {args.steps_per_round} step(s) each, after {args.warmup} warm-up), sample batch "
        f"{args.sample_batch}\n")

  figures = {}
  for dtype in ("float32", "bfloat16"):
    figures.update(train_figures(args, config, ours, params, theirs, torch_device, dtype))
    if torch_device == "cuda":
      torch.cuda.empty_cache()  # the next phase's memory goes to whichever framework needs it
  figures.update(sampler_figures(args, config, ours, params, theirs, torch_device))

  rows = [[name, fmt(a), fmt(b) if b else "n/a", fmt(a / b) if b else "n/a"]
          for name, (a, b) in sorted(figures.items(), key=lambda kv: kv[0].startswith("compile"))]
  print(f"\nsummary: {device_name}; PyTorch on {torch_name}")
  common.print_table(["figure", "ddpm-jax", "PyTorch", "ddpm-jax ÷ PyTorch"], rows)
  print(f"\ndevice: {device_name}; whole run {time.perf_counter() - t_start:.0f} s (budget 8 min)")


if __name__ == "__main__":
  main()
