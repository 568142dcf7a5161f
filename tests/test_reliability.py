"""Nothing lost: torn checkpoints, incompatible restarts, non-finite steps, SIGTERM."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm_jax import recorded_config
from ddpm_jax import trained_params
from ddpm_jax.modes import train
from conftest import REPO, TINY_FLAGS, assert_trees_equal, one_device_env, tiny_config
import unwritable_checkpoints_worker


def test_restart_with_a_different_model_is_refused_and_nothing_is_touched(tmp_path):
  trained = train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
  before = sorted(glob.glob(str(tmp_path / "**"), recursive=True))
  config = tiny_config(num_train_steps=4)
  config.model.ch = 64
  config.diffusion.num_timesteps = 200
  with pytest.raises(ValueError, match="diffusion.num_timesteps: 100 -> 200; model.ch: 32 -> 64") as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert "\n" not in str(e.value)
  assert sorted(glob.glob(str(tmp_path / "**"), recursive=True)) == before
  # remat may change (how the params are computed, not what they are), also for a workdir recorded before
  # model.remat existed: the remat model restores the checkpoint as it is (test_unet.py checks its gradients).
  with open(tmp_path / "config.json") as f:
    recorded = json.load(f)
  del recorded["model"]["remat"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(recorded, f)
  config = tiny_config(num_train_steps=2)
  config.model.remat = True
  config.model.dropout = 0.3  # a training setting, too: distillation's students resume without their teacher's
  restored = train.train_and_evaluate(config, str(tmp_path))
  assert int(restored.step) == 2
  assert_trees_equal(restored.params, trained.params)


def test_params_are_read_only_with_the_settings_they_were_trained_with(tmp_path):
  # A checkpoint does not say what its network predicts: a v-model sampled as an ε-model (or on another noise
  # schedule) would give noise without an error.
  train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
  before = sorted(glob.glob(str(tmp_path / "**"), recursive=True))
  config = tiny_config()
  config.diffusion.model_mean_type, config.diffusion.beta_end = "v", 0.03
  with pytest.raises(ValueError, match=r"diffusion.beta_end: 0.02 -> 0.03; diffusion.model_mean_type: 'eps' -> 'v'"):
    recorded_config.check_readable(config, str(tmp_path))
  with pytest.raises(ValueError, match=r"diffusion.model_mean_type: 'eps' -> 'v'"):  # the library's loader, too
    trained_params.load(config, str(tmp_path))
  # Free to differ: the fixed variance the chain samples with (the paper samples one model with either), how the
  # network is computed, and what training alone uses.
  config = tiny_config()
  config.diffusion.model_var_type = "fixedsmall" if config.diffusion.model_var_type == "fixedlarge" else "fixedlarge"
  config.model.dtype, config.model.dropout, config.training.batch_size = "bfloat16", 0.3, 64
  recorded_config.check_readable(config, str(tmp_path))
  cmd = [sys.executable, "main.py", *TINY_FLAGS, f"--workdir={tmp_path}", "--mode=sample",
         "--config.diffusion.model_mean_type=v"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=one_device_env())
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "diffusion.model_mean_type: 'eps' -> 'v'" in last and "--config.diffusion.model_mean_type=eps" in last, last
  assert sorted(glob.glob(str(tmp_path / "**"), recursive=True)) == before


def test_a_round_directory_is_read_as_its_student_and_resumed_with_its_form(tmp_path):
  # A round's directory records its run's config, whose mean type is the first teacher's (eps here): its student is
  # read as the v-model distill.parameterization made it, also where the round ran before
  # distill.first_round_parameterization existed and its record lacks the field.
  recorded = json.loads(tiny_config().to_json_best_effort())
  recorded["distill"].update(start_steps=4, end_steps=1, parameterization="v")
  del recorded["distill"]["first_round_parameterization"]
  round_dir = tmp_path / "distill" / "2"
  round_dir.mkdir(parents=True)
  (round_dir / recorded_config.FILENAME).write_text(json.dumps(recorded))
  student = tiny_config()
  student.diffusion.model_mean_type = "v"
  recorded_config.check_readable(student, str(round_dir))
  with pytest.raises(ValueError, match=r"diffusion.model_mean_type: 'v' -> 'eps'"):
    recorded_config.check_readable(tiny_config(), str(round_dir))
  # Not a round of this distillation (no 3-step student halves 4 steps): the record is compared as it is.
  other = tmp_path / "distill" / "3"
  other.mkdir()
  (other / recorded_config.FILENAME).write_text(json.dumps(recorded))
  recorded_config.check_readable(tiny_config(), str(other))
  # Resuming the round with another student form (or grid) is refused, before its record is rewritten; a training
  # run's workdir may change its distill fields (they are for later rounds, not its own params).
  form = tiny_config()
  form.distill.start_steps, form.distill.parameterization = 4, "x"
  with pytest.raises(ValueError, match=r"distill.parameterization: 'v' -> 'x'"):
    train.check_workdir_config(form, str(round_dir))
  assert json.loads((round_dir / recorded_config.FILENAME).read_text())["distill"]["parameterization"] == "v"
  form.distill.parameterization = "v"
  train.check_workdir_config(form, str(round_dir))
  (tmp_path / recorded_config.FILENAME).write_text(json.dumps(recorded))
  form.distill.parameterization = "x"
  train.check_workdir_config(form, str(tmp_path))


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  straight = train.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path / "straight"))
  work = tmp_path / "torn"
  train.train_and_evaluate(tiny_config(num_train_steps=4), str(work))
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]
  for path in glob.glob(str(work / "checkpoints" / "4" / "state" / "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:  # truncate every file of step 4's state
        f.truncate(max(0, os.path.getsize(path) // 3))
  with caplog.at_level("WARNING"):
    resumed = train.train_and_evaluate(tiny_config(num_train_steps=4), str(work))
  assert "step 4" in caplog.text and "falling back to step 2" in caplog.text
  assert_trees_equal(resumed, straight)  # steps 3-4 were retrained exactly
  assert glob.glob(str(work / "checkpoints" / "4.unreadable-*"))  # kept for inspection, not deleted
  assert sorted(d for d in os.listdir(work / "checkpoints") if d.isdigit()) == ["2", "4"]


def test_nonfinite_steps_stop_the_run_or_are_skipped(tmp_path):
  config = tiny_config(num_train_steps=4)
  config.optim.lr = 1e38  # the first update overflows the params; later losses are inf/NaN
  config.optim.warmup_steps = 0
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient .* up to step 2") as e:
    train.train_and_evaluate(config, str(tmp_path / "stop"))
  assert "last checkpoint (step None) is intact" in str(e.value)
  assert not glob.glob(str(tmp_path / "stop" / "checkpoints" / "[0-9]*"))
  config.training.skip_nonfinite_steps = True
  state = train.train_and_evaluate(config, str(tmp_path / "skip"))
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))  # no NaN reached the state


def test_sampling_errors_are_one_line_and_write_nothing(tmp_path):
  from ddpm_jax.modes import sample as sample_mode
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*; train first") as e:
    sample_mode.run(config, str(tmp_path))
  assert "\n" not in str(e.value) and not os.listdir(tmp_path)
  config.sampling.num_samples = 0
  with pytest.raises(ValueError, match="sampling.num_samples must be > 0, got 0"):
    sample_mode.run(config, str(tmp_path))
  config.sampling.num_samples, config.sampling.batch_size = 8, 12
  with pytest.raises(ValueError, match="sampling.batch_size = 12: not divisible by the 8 devices"):
    sample_mode.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_a_second_signal_exits_at_once_and_handlers_are_restored():
  script = ("import os, signal, time\n"
            "from ddpm_jax.preemption import GracefulStop\n"
            "before = signal.getsignal(signal.SIGTERM)\n"
            "with GracefulStop() as stop:\n"
            "  os.kill(os.getpid(), signal.SIGINT)\n"
            "  time.sleep(0.1)\n"
            "  print('first', stop.requested, flush=True)\n"
            "  with GracefulStop():\n"
            "    pass\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(10)\n"
            "  print('still running', flush=True)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.stdout.split() == ["first", "True"], proc.stdout + proc.stderr
  assert proc.returncode == 128 + signal.SIGTERM and "Second SIGTERM: exiting now without saving" in proc.stderr
  restored = ("import signal\nfrom ddpm_jax.preemption import GracefulStop\n"
              "before = signal.getsignal(signal.SIGTERM)\nwith GracefulStop():\n  pass\n"
              "assert signal.getsignal(signal.SIGTERM) is before\n")
  assert subprocess.run([sys.executable, "-c", restored], cwd=REPO, timeout=60).returncode == 0


@pytest.mark.parametrize("flag, msg", [
    ("--config.optim.lrr=1", "unknown config field 'lrr'; did you mean 'lr'?"),
    ("--config.optimm.lr=1", "unknown config field 'optimm'; did you mean 'optim'?"),
    ("--config.optim.lr=fast", "flag --config.optim.lr=fast: could not convert string to float: 'fast'"),
    ("--config.training.batch_size=1.5", "--config.training.batch_size=1.5"),
    ("--mode=evaluate", "value should be one of <train|sample|eval|sweep|distill|edit>"),
])
def test_command_line_mistakes_are_one_line_errors(tmp_path, flag, msg):
  cmd = [sys.executable, "main.py", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}", flag]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert msg in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")


def test_unwritable_workdir_is_refused_before_training(tmp_path):
  (tmp_path / "a_file").write_text("mine")
  with pytest.raises(ValueError, match="cannot write to workdir .*; choose a writable --workdir"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "a_file" / "run"))
  assert (tmp_path / "a_file").read_text() == "mine"


def test_checkpoint_directory_made_unwritable_mid_run_stops_the_run_at_the_next_save(tmp_path):
  repo = tmp_path / "repo"  # a copy of the project, so that the relative workdir lands inside tmp_path
  shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__"))
  flags = list(TINY_FLAGS) + ["--config.training.num_train_steps=6", "--workdir=runs/digits"]
  start = time.time()
  # main.py as the README runs it (relative workdir), its checkpoint directory made unwritable after step 2's save.
  out = subprocess.run([sys.executable, "tests/unwritable_checkpoints_worker.py"] + flags, cwd=repo, env=one_device_env(),
                       capture_output=True, text=True, timeout=600)
  checkpoints = repo / "runs" / "digits" / "checkpoints"
  if os.path.isdir(checkpoints):
    unwritable_checkpoints_worker.make_writable(checkpoints)
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("main.py: error: saving the checkpoint of step 4 to " + str(checkpoints)), last
  assert "Operation not permitted" in last or "Permission denied" in last, last
  assert "the last complete checkpoint (step 2) is kept" in last, last
  assert "Starting at step 0" in out.stderr and "[6]" not in out.stderr  # stopped at the failed save, not later
  assert sorted(os.listdir(checkpoints)) == ["2"]
  # The same command, the disk mended, resumes from the kept checkpoint.
  resumed = subprocess.run([sys.executable, "main.py"] + flags, cwd=repo, env=one_device_env(), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Starting at step 2 of 6" in resumed.stderr
  assert time.time() - start < 400


def test_a_save_failing_in_orbax_background_thread_stops_the_run_before_the_next_save(tmp_path, monkeypatch, caplog):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from ddpm_jax import checkpointing  # pylint: disable=import-outside-toplevel

  class Failing:  # an Orbax commit future whose write fails in the background thread
    def result(self, timeout=None):
      del timeout
      raise OSError("injected: disk quota exceeded")
  original = ocp.handlers.JsonCheckpointHandler.async_save

  async def fail_at_step_20(self, directory, *args, **kwargs):
    if "/20." in str(directory):
      return [Failing()]
    return await original(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", fail_at_step_20)
  config = tiny_config(num_train_steps=200, checkpoint_every_steps=20)
  with caplog.at_level("INFO"), pytest.raises(checkpointing.SaveError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"saving the checkpoint of step 20 to {tmp_path / 'checkpoints'} failed (OSError: "
                            "injected: disk quota exceeded); the last complete checkpoint (none) is kept"), message
  logged_steps = [int(m) for m in re.findall(r"\[(\d+)\] grad_norm=", caplog.text)]
  assert 20 <= max(logged_steps) < 40  # noticed by the train loop, before the step-40 save would have
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step() is None
