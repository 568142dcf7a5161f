"""Fault injection: kill a digits training run at random moments, resume it each time, compare with an unkilled run.

  python benchmarks/fault_injection.py --kills=10 --signal=KILL [--corrupt_latest] [--seed=0] [--workdir=DIR]
  python benchmarks/fault_injection.py --kills=3 --signal=KILL,TERM --corrupt_latest=TERM   # KILL, TERM, KILL

Prints `kills survived / kills tried, steps lost, final params equal`. A kill survived when it landed mid-run and
the run it stopped left a resumable workdir: with SIGKILL the process died of the signal; with SIGTERM (a graceful
stop) it saved the step it reached and exited 0 within STOP_SECONDS. With --corrupt_latest the newest checkpoint is
truncated after every kill (with --corrupt_latest=TERM, after the SIGTERMs only), so each such resume must fall back
to the one before. A persistent compilation cache (JAX_COMPILATION_CACHE_DIR if set, else one in the workdir) makes
the restarts cheap.
"""
import argparse
import glob
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/digits.py", "--config.data.image_size=8", "--config.model.ch_mult=(1,2)",
        "--config.model.attn_resolutions=(4,)", "--config.diffusion.num_timesteps=100",
        "--config.training.batch_size=8", "--config.training.log_every_steps=1",
        "--config.training.checkpoint_every_steps=3", "--config.training.sample_every_steps=0",
        "--config.training.keep_checkpoints=5"]


STOP_SECONDS = 30  # a Cloud TPU preemption notice


def _env(cache_dir):
  """One CPU device, the caller's other XLA flags; the caller's compilation cache (e.g. the test suite's, shared by
  every test) or cache_dir."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=1"]))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  return env


def _cmd(workdir, steps):
  return [sys.executable, "main.py", f"--workdir={workdir}"] + TINY + [f"--config.training.num_train_steps={steps}"]


def final_params(workdir):
  """The newest checkpoint's state leaves as NumPy arrays (read back with Orbax, as training does)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  import jax  # pylint: disable=g-import-not-at-top
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def _corrupt_latest(workdir):
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  if len(steps) < 2:
    return None
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(steps[-1]), "state", "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  return steps[-1]


def run(kills, signals, corrupt_after, seed, workdir, steps):
  """signals: "KILL" or "TERM" each, the k-th kill sending signals[k % len(signals)]; the newest checkpoint is
  truncated after the kills whose signal is in corrupt_after."""
  rng = random.Random(seed)
  cache = os.path.join(workdir, "jax_cache")
  env = _env(cache)
  ref = os.path.join(workdir, f"reference_{steps}")  # shared by runs in the same workdir: made once
  tag = "_".join(signals) + ("_corrupt_" + "_".join(corrupt_after) if corrupt_after else "")
  victim = os.path.join(workdir, f"killed_{tag}_seed{seed}")
  if os.path.isdir(victim):
    raise ValueError(f"{victim} exists from an earlier run; use another --workdir or --seed.")
  if not os.path.isdir(os.path.join(ref, "checkpoints", str(steps))):
    subprocess.run(_cmd(ref, steps), cwd=REPO, env=env, check=True, capture_output=True)
  survived, steps_lost = 0, 0
  for k in range(kills):
    sig = signals[k % len(signals)]
    proc = subprocess.Popen(_cmd(victim, steps), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    target = rng.randint(2, 9)  # steps to let pass before the kill, counted from this start
    seen, first = None, None
    for line in proc.stderr:
      m = re.search(r"\] \[(\d+)\] .*loss=", line) or re.search(r"\[(\d+)\] grad_norm=", line)
      if m:
        seen = int(m.group(1))
        first = seen if first is None else first
        if seen - first + 1 >= target:
          break
    landed = proc.poll() is None  # not after the run had ended
    if landed:
      proc.send_signal(signal.SIGKILL if sig == "KILL" else signal.SIGTERM)
    sent = time.time()
    rest = proc.communicate(timeout=120)[1]
    stop_seconds = time.time() - sent
    ckpts = [int(d) for d in os.listdir(os.path.join(victim, "checkpoints")) if d.isdigit()]
    saved = max(ckpts) if ckpts else 0
    if sig == "KILL":
      ok = landed and proc.returncode == -signal.SIGKILL
    else:  # the step it reached is saved, and it exits 0 before the preemption notice runs out
      ok = (landed and proc.returncode == 0 and stop_seconds < STOP_SECONDS and seen is not None and saved >= seen
            and "Stopped at step" in rest)
    truncated = _corrupt_latest(victim) if sig in corrupt_after else None
    if truncated is not None:
      saved = sorted(ckpts)[-2]
    steps_lost += max(0, (seen or 0) - saved)
    print(f"kill {k + 1}: signal {sig} after step {seen}; exit status {proc.returncode} {stop_seconds:.1f} s later; "
          f"{'' if truncated is None else f'checkpoint {truncated} truncated; '}resuming from step {saved}"
          f"{'' if ok else ' (NOT SURVIVED)'}", flush=True)
    survived += ok
  subprocess.run(_cmd(victim, steps), cwd=REPO, env=env, check=True, capture_output=True)
  (ref_step, ref_leaves), (step, leaves) = final_params(ref), final_params(victim)
  equal = (ref_step == step == steps and len(ref_leaves) == len(leaves)
           and all(np.array_equal(a, b) for a, b in zip(ref_leaves, leaves)))
  print(f"kills survived / kills tried: {survived} / {kills}, steps lost: {steps_lost}, final params equal: {equal}")
  return equal and survived == kills


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=3)
  parser.add_argument("--signal", default="KILL", help="KILL, TERM, or a comma-separated list taken in turn")
  parser.add_argument("--corrupt_latest", nargs="?", const="KILL,TERM", default="",
                      help="truncate the newest checkpoint after every kill, or after those of the signals given")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=40, help="length of the training run")
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="ddpm_faults_")
  t0 = time.time()
  signals, corrupt_after = args.signal.split(","), [c for c in args.corrupt_latest.split(",") if c]
  for flag, names in (("--signal", signals), ("--corrupt_latest", corrupt_after)):
    if not set(names) <= {"KILL", "TERM"}:
      parser.error(f"{flag}={','.join(names)}: each signal must be KILL or TERM")
  ok = run(args.kills, signals, corrupt_after, args.seed, workdir, args.steps)
  print(f"({time.time() - t0:.0f} s, workdir {workdir})")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
