"""Fault injection: kill a digits training run at random moments, resume it each time, compare with an unkilled run.

  python benchmarks/fault_injection.py --kills=10 --signal=KILL [--corrupt_latest] [--seed=0] [--workdir=DIR]
  python benchmarks/fault_injection.py --kills=3 --signal=KILL,TERM --corrupt_latest=TERM   # KILL, TERM, KILL
  python benchmarks/fault_injection.py --mode=distill --kills=2 --signal=KILL,TERM  # kills across distillation rounds

With --mode=distill the run killed distills a tiny model trained 2 steps: rounds 4 → 2 and 2 → 1 of --steps steps
each, every round a training run of its own under WORKDIR/distill/<n>/. A kill counts steps from its run's start
across rounds, so it can land in either round; every round's final params are compared with the unkilled run's.

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
import shutil
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


DISTILL_ROUNDS = (2, 1)  # the students' steps: rounds 4 → 2 and 2 → 1
TEACHER_STEPS = 2  # the distilled model's training: params to start from, not good ones


def _cmd(workdir, steps, mode="train"):
  """main.py on the tiny config: training `steps` steps, or distilling its teacher in rounds of `steps` steps."""
  if mode == "train":
    return [sys.executable, "main.py", f"--workdir={workdir}"] + TINY + [f"--config.training.num_train_steps={steps}"]
  return [sys.executable, "main.py", "--mode=distill", f"--workdir={workdir}"] + TINY + [
      f"--config.training.num_train_steps={TEACHER_STEPS}", f"--config.distill.start_steps={2 * DISTILL_ROUNDS[0]}",
      f"--config.distill.end_steps={DISTILL_ROUNDS[-1]}", f"--config.distill.steps_per_round={steps}",
      "--config.distill.lr=1e-3", "--config.optim.warmup_steps=0"]  # rounds shorter than the demo's warmup


def _runs(workdir, mode):
  """The directories of the training runs a job in workdir makes: itself, or one per distillation round."""
  if mode == "train":
    return [workdir]
  return [os.path.join(workdir, "distill", str(n)) for n in DISTILL_ROUNDS]


def final_params(run_dir):
  """The newest checkpoint's state leaves as NumPy arrays (read back with Orbax, as training does)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), item_names=("state", "data"))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  import jax  # pylint: disable=g-import-not-at-top
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def _checkpoint_steps(run_dir):
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []


def _corrupt_latest(run_dir):
  steps = _checkpoint_steps(run_dir)
  if len(steps) < 2:
    return None
  for path in glob.glob(os.path.join(run_dir, "checkpoints", str(steps[-1]), "state", "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  return steps[-1]


def run(kills, signals, corrupt_after, seed, workdir, steps, mode="train"):
  """signals: "KILL" or "TERM" each, the k-th kill sending signals[k % len(signals)]; the newest checkpoint is
  truncated after the kills whose signal is in corrupt_after. mode: 'train' or 'distill' (of a tiny teacher)."""
  rng = random.Random(seed)
  cache = os.path.join(workdir, "jax_cache")
  env = _env(cache)
  prefix = "" if mode == "train" else "distill_"
  ref = os.path.join(workdir, f"{prefix}reference_{steps}")  # shared by runs in the same workdir: made once
  tag = "_".join(signals) + ("_corrupt_" + "_".join(corrupt_after) if corrupt_after else "")
  victim = os.path.join(workdir, f"{prefix}killed_{tag}_seed{seed}")
  if os.path.isdir(victim):
    raise ValueError(f"{victim} exists from an earlier run; use another --workdir or --seed.")
  if mode == "distill":  # the teacher, trained once; the reference and the victim distill copies of it
    teacher = os.path.join(workdir, "distill_teacher")
    if not os.path.isdir(os.path.join(teacher, "checkpoints", str(TEACHER_STEPS))):
      subprocess.run(_cmd(teacher, TEACHER_STEPS), cwd=REPO, env=env, check=True, capture_output=True)
    for target_dir in (ref, victim):
      if not os.path.isdir(target_dir):
        shutil.copytree(teacher, target_dir)
  if steps not in _checkpoint_steps(_runs(ref, mode)[-1]):
    subprocess.run(_cmd(ref, steps, mode), cwd=REPO, env=env, check=True, capture_output=True)
  survived, steps_lost = 0, 0
  for k in range(kills):
    sig = signals[k % len(signals)]
    proc = subprocess.Popen(_cmd(victim, steps, mode), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    target = rng.randint(2, 9)  # steps to let pass before the kill, counted from this start, across rounds
    run_dir, seen, last, progress = victim, None, None, 0
    for line in proc.stderr:
      r = re.search(r"Round \d+ → \d+ steps in (\S+)", line)
      if r:  # distill: a new round, a training run in its own directory, counting its steps from 0
        run_dir = os.path.join(REPO, r.group(1))  # main.py's path, relative to its working directory
      m = re.search(r"\] \[(\d+)\] .*loss=", line) or re.search(r"\[(\d+)\] grad_norm=", line)
      if m and (run_dir, int(m.group(1))) != last:
        seen, last, progress = int(m.group(1)), (run_dir, int(m.group(1))), progress + 1
        if progress >= target:
          break
    landed = proc.poll() is None  # not after the run had ended
    if landed:
      proc.send_signal(signal.SIGKILL if sig == "KILL" else signal.SIGTERM)
    sent = time.time()
    rest = proc.communicate(timeout=120)[1]
    stop_seconds = time.time() - sent
    ckpts = _checkpoint_steps(run_dir)
    saved = max(ckpts) if ckpts else 0
    if sig == "KILL":
      ok = landed and proc.returncode == -signal.SIGKILL
    else:  # the step it reached is saved, and it exits 0 before the preemption notice runs out
      ok = (landed and proc.returncode == 0 and stop_seconds < STOP_SECONDS and seen is not None and saved >= seen
            and "Stopped at step" in rest)
    truncated = _corrupt_latest(run_dir) if sig in corrupt_after else None
    if truncated is not None:
      saved = sorted(ckpts)[-2]
    steps_lost += max(0, (seen or 0) - saved)
    where = "" if mode == "train" else f" of {os.path.relpath(run_dir, os.path.join(REPO, victim))}"
    print(f"kill {k + 1}: signal {sig} after step {seen}{where}; exit status {proc.returncode} "
          f"{stop_seconds:.1f} s later; {'' if truncated is None else f'checkpoint {truncated} truncated; '}"
          f"resuming from step {saved}{'' if ok else ' (NOT SURVIVED)'}", flush=True)
    survived += ok
  subprocess.run(_cmd(victim, steps, mode), cwd=REPO, env=env, check=True, capture_output=True)
  equal = True
  for ref_run, victim_run in zip(_runs(ref, mode), _runs(victim, mode)):  # every distillation round's student
    (ref_step, ref_leaves), (step, leaves) = final_params(ref_run), final_params(victim_run)
    equal &= (ref_step == step == steps and len(ref_leaves) == len(leaves)
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
  parser.add_argument("--steps", type=int, default=40, help="length of the training run (of each round)")
  parser.add_argument("--mode", choices=("train", "distill"), default="train")
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="ddpm_faults_")
  t0 = time.time()
  signals, corrupt_after = args.signal.split(","), [c for c in args.corrupt_latest.split(",") if c]
  for flag, names in (("--signal", signals), ("--corrupt_latest", corrupt_after)):
    if not set(names) <= {"KILL", "TERM"}:
      parser.error(f"{flag}={','.join(names)}: each signal must be KILL or TERM")
  ok = run(args.kills, signals, corrupt_after, args.seed, workdir, args.steps, args.mode)
  print(f"({time.time() - t0:.0f} s, workdir {workdir})")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
