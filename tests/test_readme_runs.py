"""The README's set-up command and every offline command of README.md and docs/ run as written: from a fresh copy of
the project, with the relative workdirs they print, shortened only by appended --config.* overrides.

The set-up command and its rerun are processes of their own, exactly as printed; the other commands run one after
another in one process (tests/commands_worker.py), which imports once and compiles what they share once. Like every
test, they compile without LLVM optimisation (conftest.UNOPTIMISED_XLA): this test checks what the commands do and
write."""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, one_device_env, shown_commands

# Appended to every command: a few steps of a T = 20 chain instead of hundreds of a T = 1000 one, and the demo's
# U-Net with two levels instead of three (a shape, not a code path: every program compiles ~15% faster).
SHORT = ("--config.diffusion.num_timesteps=20", "--config.model.ch_mult=(1,2)",
         "--config.training.steps_per_dispatch=1", "--config.training.num_train_steps=4",
         "--config.training.checkpoint_every_steps=2", "--config.training.log_every_steps=2",
         "--config.training.sample_every_steps=4", "--config.training.num_grid_samples=4",
         "--config.training.fid_every_steps=0")
# Per mode, on top: 6 samples in batches of 4 for --mode=sample (the last batch short), 8 otherwise, Inception
# passes of 8 images (not 100, 92 of them padding), 4 examples for bits/dim, no figures in --mode=eval (their four
# programs compile in tests/test_evaluate.py, which runs that mode with them), one sweep point (each point of each
# sampler compiles its own chain; sweeps on the same workdir share a point's samples), and reference statistics
# from a file (computing them from all 1,797 digits is minutes of Inception on a CPU; tests/test_evaluate.py covers
# that stage and tests/test_sampler_sweep.py a sweep of two points).
MODE_SHORT = dict(
    train=(),
    sample=("--config.sampling.num_samples=6", "--config.sampling.batch_size=4"),
    eval=("--config.eval.num_samples=8", "--config.sampling.batch_size=8", "--config.eval.inception_batch_size=8",
          "--config.eval.bpd_num_examples=4", "--config.eval.bpd_batch_size=4", "--config.eval.figures=False",
          "--config.eval.ref_stats=runs/ref_stats.npz"),
    sweep=("--config.eval.num_samples=8", "--config.sampling.batch_size=8", "--config.eval.inception_batch_size=8",
           "--config.eval.sweep_steps=(5,)", "--config.eval.ref_stats=runs/ref_stats.npz"),
    # One round (8 → 4 steps) of two train steps, so that the documented distill/4 student exists; no warmup, which
    # a round's falling lr must outlast.
    distill=("--config.distill.start_steps=8", "--config.distill.end_steps=4", "--config.distill.steps_per_round=2",
             "--config.optim.warmup_steps=0"),
    # Four images, a 5-step chain, RePaint's walk with one resampling of 2 steps.
    edit=("--config.edit.num_images=4", "--config.edit.num_steps=5", "--config.edit.jumps=2",
          "--config.edit.jump_length=2", "--config.sampling.batch_size=4"),
)


def setup_block():
  """The commands of README.md's '## Set-up' bash block, one per line, read from README.md itself."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    section = f.read().split("## Set-up", 1)[1]
  return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()


def _python_main(command):
  """The `python main.py …` part of a shell line such as `pip install -e . && python main.py …`, as argv."""
  part = [p for p in command.split("&&") if p.strip().startswith("python main.py")]
  assert len(part) == 1, command
  return [sys.executable] + shlex.split(part[0])[1:]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
  """A fresh copy of the project (what a clone holds), so relative workdirs land in a directory of the test's own."""
  root = tmp_path_factory.mktemp("clone") / "ddpm-jax"
  shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info"))
  return root


def _shortened(args, *more):
  """args + SHORT + the mode's MODE_SHORT + more, the later of two settings of a field winning. The earlier one is
  dropped, not left to be overridden: ml_collections joins a tuple field's two values ((5, 10, 20) then (5,) would
  sweep (5, 10, 20, 5))."""
  mode = next((a.split("=", 1)[1] for a in args if a.startswith("--mode=")), "train")
  flags = list(args) + list(SHORT) + list(MODE_SHORT[mode]) + list(more)
  field = lambda flag: flag.split("=", 1)[0] if flag.startswith("--config.") else None
  return [f for i, f in enumerate(flags) if field(f) is None or field(f) not in map(field, flags[i + 1:])]


def _run(project, argv, *more):
  """Runs argv, shortened, from the project root; returns its log."""
  proc = subprocess.run(_shortened(argv, *more), cwd=project, env=one_device_env(), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stderr[-4000:]}"
  return proc.stderr


def test_the_readme_setup_trains_the_demo_then_resumes_and_every_offline_doc_command_runs(project):
  first, tests = setup_block()
  assert first.startswith("pip install -e . && python main.py") and "pytest" in tests
  argv = _python_main(first)
  assert "--workdir=runs/digits" in argv
  log = _run(project, argv)
  workdir = project / "runs" / "digits"
  assert "Starting at step 0 of 4" in log
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert os.path.getsize(workdir / "samples" / "step_00000004.png") > 0
  assert glob.glob(str(workdir / "events.out.tfevents.*")) and os.path.isfile(workdir / "config.json")

  # The same command again: it resumes from the latest checkpoint (here with two more steps to train).
  log = _run(project, argv, "--config.training.num_train_steps=6")
  assert "Restored checkpoint of step 4" in log and "Starting at step 4 of 6" in log
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]

  # Every other digits command the README and docs/ show (the rest need CIFAR-10, gs:// or an accelerator; their
  # flags are checked by test_docs.py), from the project root with the relative paths printed.
  np.savez(project / "runs" / "ref_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  offline = [(path, a) for path, a in shown_commands("python main.py") if "--config=configs/digits.py" in a]
  modes, ran, commands = set(), {tuple(argv[2:])}, []  # the set-up command ran above; one shown twice runs once
  for path, shown in offline:
    if tuple(shown) in ran:
      continue
    ran.add(tuple(shown))
    # Six steps, and no sample grid: the set-up command above drew one (each grid's chain compiles anew). The
    # 16×16 commands run at the demo's 8×8: the size is a shape, not a code path, and their programs compiled anew
    # would take a minute of the 2 cores.
    at_8 = ("--config.data.image_size=8", "--config.model.attn_resolutions=(4,)")
    at_8 = at_8 if "--config.data.image_size=16" in shown else ()
    commands.append(_shortened(shown, "--config.training.num_train_steps=6", "--config.training.sample_every_steps=0",
                               *at_8))
    modes.add(next((a.split("=", 1)[1] for a in shown if a.startswith("--mode=")), "train"))
    print(f"runs {path}: python {' '.join(shown)}")
  assert {"train", "sample", "eval", "sweep", "distill", "edit"} <= modes
  proc = subprocess.run([sys.executable, os.path.join("tests", "commands_worker.py")], input=json.dumps(commands),
                        cwd=project, env=one_device_env(), capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-4000:]
  ran_lines = [line for line in proc.stderr.splitlines() if line.startswith("ran: python main.py")]
  assert len(ran_lines) == len(commands), proc.stderr[-4000:]
  print("\n".join(ran_lines))  # with their seconds (pytest -s shows them)
  sample_dir = workdir / "samples" / "step_00000006"  # the paper's sampler's; the solvers' have their own
  samples = np.concatenate([np.load(p)["arr_0"] for p in sorted(glob.glob(str(sample_dir / "samples_*.npz")))])
  assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8 and samples.std() > 0
  assert os.path.getsize(sample_dir / "grid.png") > 0
  with open(workdir / "eval" / "results_step_00000006.json", encoding="utf-8") as f:
    digits = json.load(f)["digits"]  # the demo's own numbers: FID against its floor, and readable samples
  assert digits["num_samples"] == 8 and 0 <= digits["confident_share"] <= 1 and digits["classifier_accuracy"] > 0.9
  assert sum(digits["predicted_counts"]) == 8 and digits["floor_fid"] > 0
  # No real digit is a near-copy of another, so a model's copies would stand out.
  assert digits["real_copy_share"] == 0.0 and 0 <= digits["copy_share"] <= 1
  assert glob.glob(str(workdir / "eval" / "sweep_step_00000006.json"))
  for task in ("inpaint_half_5_j2x2", "sdedit_0.5_5"):  # docs/editing.md's two commands
    edited = np.load(workdir / "edit" / f"step_00000006_{task}" / "edited.npz")
    assert edited["arr_0"].shape == edited["arr_1"].shape == (4, 8, 8, 1)
  student = glob.glob(str(workdir / "distill" / "4" / "samples" / "step_00000002_ddim4_eta0.0_trailing" / "*.npz"))
  assert student and np.concatenate([np.load(p)["arr_0"] for p in student]).shape == (6, 8, 8, 1)


def test_the_converter_help_runs_from_the_project_root(project):
  proc = subprocess.run([sys.executable, "-m", "ddpm_jax.convert", "--help"], cwd=project, capture_output=True,
                        text=True, timeout=120)
  # absl's --help exits with status 1 after printing the flags.
  assert proc.returncode in (0, 1) and "--input" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
