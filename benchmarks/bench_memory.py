"""Peak memory (RSS) of the train step: ours, ours with remat, and PyTorch, each in a fresh process.

  python benchmarks/bench_memory.py [--batch=32] [--steps=2] [--variants ours ours_remat diffusers] [--quick]

Each variant runs in its own child process (so allocator caches and compile buffers never carry over), which builds
its model, optimizer state and batch, then runs --steps train steps (the same steps bench_train times). The child
reads its peak RSS (VmHWM) at the end of the first step, resets it, and reads it again after the later steps: the
process's peak is the larger, and the two show whether the first step (imports, state, compile) or the steady
state sets it. (The reset also clears the kernel's ru_maxrss, so the parent takes the child's figures, not its
rusage.) The child also reports its RSS after the imports and the weights ("base"), so that what the optimizer
state, the compile and the step add shows apart from the imports. Our child imports JAX and ddpm_jax.train_step (no
TensorFlow: --mode=train's loop adds it through clu's writers, +0.5 GB), never torch; the PyTorch child never
imports JAX.
The last line is the headline: peak RSS ours ÷ PyTorch, without and with remat.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

# The *_memsched variants compile with XLA:CPU's memory-optimised scheduler in place of its default, concurrency-
# optimised one: 18% less temporary memory at batch 32, not at batch 8 (docs/performance.md).
MEMSCHED = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
VARIANTS = {"ours": (dict(), ""), "ours_remat": (dict(remat=True), ""), "ours_memsched": (dict(), MEMSCHED),
            "ours_remat_memsched": (dict(remat=True), MEMSCHED), "ours_bf16": (dict(dtype="bfloat16"), ""),
            "diffusers": (None, "")}


def _status_mib(field):
  """A memory field of /proc/self/status (VmRSS: now; VmHWM: the peak since start or the last reset), MiB."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024


def _reset_peak():
  """Restarts VmHWM from the current RSS (Linux ≥ 4.0), so the later steps' own peak shows apart from the first's."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def child(variant, model_name, batch, steps, threads):
  """Runs in the child: builds the variant, runs the steps, prints one JSON line."""
  config = common.train_config(model_name)
  fields, size, channels = common.MODELS[model_name]
  batch_np = common.random_batch(model_name, batch)
  if variant == "diffusers":
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    model = common.diffusers_unet(**fields, size=size, channels=channels, dropout=config.model.dropout)
    base = _status_mib("VmRSS")
    step, _ = common.torch_train_step(model, config, batch_np)  # runs the first step
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from ddpm_jax import train_step  # pylint: disable=g-import-not-at-top,unused-import  # its imports count in base
    from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
    options = dict(VARIANTS[variant][0])
    options["dtype"] = jnp.dtype(options.get("dtype", "float32"))
    model = unet.UNet(out_ch=channels, dropout=config.model.dropout, **fields, **options)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)),
                                 jnp.zeros((1,), jnp.int32))
    params = jax.block_until_ready(params["params"])
    base = _status_mib("VmRSS")
    # Compiles (as main.py would: common.main_py_options), runs the first step.
    step, _, _, _ = common.ours_train_step(model, params, config, batch_np, common.main_py_options(model_name))
    del params
  first_peak = _status_mib("VmHWM")
  _reset_peak()
  t0 = time.perf_counter()
  for _ in range(steps - 1):
    step()
  step_s = (time.perf_counter() - t0) / max(steps - 1, 1)
  print("RESULT " + json.dumps(dict(base=base, step_s=step_s, first_peak=first_peak, later_peak=_status_mib("VmHWM"),
                                    tensorflow="tensorflow" in sys.modules)), flush=True)


def run_child(variant, args):
  """(the child's JSON result, its peak RSS in MiB)."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={variant}", f"--model={args.model}",
         f"--batch={args.batch}", f"--steps={args.steps}", f"--threads={args.threads}"]
  env = dict(os.environ, XLA_FLAGS=" ".join(f for f in (os.environ.get("XLA_FLAGS", ""), VARIANTS[variant][1]) if f))
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, check=False)
  out = proc.stdout
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{variant} child failed (exit {proc.returncode}):\n{out[-2000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  return result, max(result["first_peak"], result["later_peak"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=2, help="train steps per child, the first included")
  parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["ours", "ours_remat", "diffusers"])
  parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:  # a smoke test of the script: ours beside PyTorch, two fresh processes (the test suite runs it)
    args.model, args.batch, args.steps, args.variants = "tiny", 2, 2, ["ours", "diffusers"]
  if args.child:
    child(args.child, args.model, args.batch, args.steps, args.threads)
    return
  for line in common.machine_info(args.threads):
    print(line)
  print(f"model: {args.model}, batch {args.batch}, {args.steps} train steps per fresh process\n")
  results = {}
  for variant in args.variants:
    results[variant] = run_child(variant, args)
  rows = [[v, f"{peak:.0f}", f"{r['base']:.0f}", f"{peak - r['base']:.0f}", f"{r['first_peak']:.0f}",
           f"{r['later_peak']:.0f}", "yes" if r["tensorflow"] else "no", f"{r['step_s']:.2f}"]
          for v, (r, peak) in results.items()]
  common.print_table(["variant", "peak RSS MiB", "base MiB", "peak − base MiB", "peak to first step end",
                      "peak of later steps", "TensorFlow loaded", "s/step"], rows)
  print("\nbase: RSS after the imports and the model's weights, before optimizer state, compile and steps; "
        "peak − base: what those add (ours: the compile included); peak to first step end: imports, state, "
        "compile and one step; peak of later steps: from the RSS after the first step (a reset of VmHWM).")
  if "diffusers" in results:
    base = results["diffusers"][1]
    parts = [f"{v} {results[v][1] / base:.2f}" for v in results if v != "diffusers"]
    print("peak RSS ÷ PyTorch: " + ", ".join(parts) + " (targets: ours ≤ 1.0, with remat ≤ 0.6)")


if __name__ == "__main__":
  main()
