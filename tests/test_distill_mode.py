"""--mode=distill end to end on the tiny config: two rounds, each a training run of its own, resumed bit-exactly
after losing its latest checkpoints (what a kill -9 between saves leaves), and a student sampled in its own steps."""
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, assert_trees_equal, tiny_config
from ddpm_jax import config_checks
from ddpm_jax import diffusion as dlib
from ddpm_jax import distillation
from ddpm_jax import images
from ddpm_jax import train_step
from ddpm_jax import trained_params
from ddpm_jax.evaluation import samples
from ddpm_jax.modes import distill
from ddpm_jax.modes import sample as sample_mode
from ddpm_jax.modes import train


def distill_config():
  config = tiny_config(num_train_steps=2)
  config.distill.start_steps, config.distill.end_steps = 4, 1  # rounds 4 → 2 and 2 → 1
  config.distill.steps_per_round, config.distill.lr = 2, 1e-3
  # A constant lr: a falling one ends with its round, so the longer first round would compile a step of its own
  # (test_fault_injection.py distills with the default, falling lr).
  config.distill.lr_schedule = "constant"
  config.distill.first_round_steps = 3  # the first round (4 → 2) longer than the others
  config.distill.ema_decay = 0.0  # no averaging, so that the test can see it is this decay, not optim's, that applies
  config.training.checkpoint_every_steps = 1
  return config


def test_two_rounds_run_and_resume_bit_exactly(tmp_path, caplog):
  config = distill_config()
  config_checks.validate(config, "distill")
  teacher = train.train_and_evaluate(config, str(tmp_path))
  compiled_before = set(train_step._COMPILED)  # pylint: disable=protected-access
  with caplog.at_level("INFO"):
    students = distill.run(config, str(tmp_path))
  assert sorted(students) == [1, 2] and int(students[2].step) == 3 and int(students[1].step) == 2
  # One compiled step for both rounds, although their teachers' parameterizations and points differ.
  assert len(set(train_step._COMPILED) - compiled_before) == 1  # pylint: disable=protected-access
  assert sorted(os.listdir(tmp_path / "distill")) == ["1", "2"]
  assert "Round 4 → 2 steps" in caplog.text and "Round 2 → 1 steps" in caplog.text
  # The students' EMA decay is distill.ema_decay (0: the EMA params are the params), not training's 0.999.
  assert config.optim.ema_decay == 0.999
  for s in students.values():
    assert_trees_equal(s.ema_params, s.params)
  # Each student moved away from the params it started from (its teacher's EMA params).
  for before, after in ((teacher.ema_params, students[2].params), (students[2].ema_params, students[1].params)):
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))) > 0

  # Lose round 2→1 and the last step of round 4→2, then rerun: the same students, bit for bit.
  shutil.rmtree(tmp_path / "distill" / "1")
  shutil.rmtree(tmp_path / "distill" / "2" / "checkpoints" / "3")
  caplog.clear()
  with caplog.at_level("INFO"):
    again = distill.run(config, str(tmp_path))
  assert "Starting at step 2 of 3" in caplog.text  # round 4→2 resumed from its step-2 checkpoint
  for steps in (1, 2):
    assert_trees_equal(again[steps].params, students[steps].params)
    assert_trees_equal(again[steps].ema_params, students[steps].ema_params)

  # Sampling the 1-step student (--mode=sample --config.sampling.checkpoint=distill/1): one DDIM step from x_T at
  # t = T − 1, i.e. the clipped x̂_0 = √ᾱ x_T − √(1 − ᾱ) v̂ of its EMA params, written to its round's directory.
  config.sampling.checkpoint = "distill/1"
  config_checks.validate(config, "sample")
  student_config, student_dir = distillation.student_run(config, str(tmp_path))
  # The round records its run's config (the ε-teacher's mean type); its student is read as the v-model it is, and
  # reading it as its teacher's ε-model is refused.
  assert (config.diffusion.model_mean_type, student_config.diffusion.model_mean_type) == ("eps", "v")
  with pytest.raises(ValueError, match=r"diffusion.model_mean_type: 'v' -> 'eps'.*--config.diffusion.model_mean_type=v"):
    trained_params.load(config, student_dir)
  out = sample_mode.run(student_config, student_dir)
  assert out.startswith(str(tmp_path / "distill" / "1" / "samples"))
  T = config.diffusion.num_timesteps
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  x_T = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), T), (8, 8, 1))
                   for i in range(config.sampling.num_samples)])
  t = jnp.full((x_T.shape[0],), T - 1, jnp.int32)
  v = train_step.create_model(config).apply({"params": students[1].ema_params}, x_T, t)
  ac = float(np.cumprod(1.0 - np.asarray(dlib.GaussianDiffusion.from_config(config.diffusion).betas, np.float64))[-1])
  want = images.to_uint8(jnp.clip(np.sqrt(ac) * x_T - np.sqrt(1.0 - ac) * v, -1.0, 1.0))
  got = samples.load_samples(out)
  assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1

  # benchmarks/distill_fidelity.py on these students, from x_T keyed by PRNGKey(seed): the first teacher against
  # itself is 0, and the 1-step student's row is the RMSE of its closed-form samples (as above) to the teacher's.
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import distill_fidelity  # pylint: disable=g-import-not-at-top
  config.sampling.checkpoint = "latest"
  shown = {}  # the --out sheet's rows
  rows = distill_fidelity.fidelity_rows(config, str(tmp_path), num=8, batch=8, seed=config.seed, shown=shown)
  assert list(shown) == [("latest", 4), ("latest", 2), ("distill/2", 2), ("latest", 1), ("distill/1", 1)]
  assert all(x.shape == (8, 8, 8, 1) for x in shown.values())
  assert [(row[0].split(":")[0], row[1]) for row in rows] == [
      ("the first teacher", 4), ("the teacher, 2 DDIM steps", 2), ("the 2-step student", 2),
      ("the teacher, 1 DDIM steps", 1), ("the 1-step student", 1)]
  assert rows[0][2:] == (0.0, 0.0, 0.0) and all(row[2] > 0 and row[3] > 0 and 0 <= row[4] <= 1 for row in rows[1:])
  config.sampling.num_steps = 4
  first = distill_fidelity.samples(config, str(tmp_path), 8, 8, jax.random.PRNGKey(config.seed))
  key = jax.random.PRNGKey(config.seed)
  x_T = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), T), (8, 8, 1)) for i in range(8)])
  v = train_step.create_model(config).apply({"params": students[1].ema_params}, x_T, t[:8])
  one_step = np.clip(np.sqrt(ac) * x_T - np.sqrt(1.0 - ac) * v, -1.0, 1.0)
  np.testing.assert_allclose(rows[-1][2], np.sqrt(np.mean(np.square(one_step - first))), rtol=1e-4)
  np.testing.assert_array_equal(shown["latest", 4], first)  # the sheet's rows are the samples the table measured
  np.testing.assert_allclose(shown["distill/1", 1], one_step, atol=1e-4)
  # Where round 1's student misses, step by step: its 2 steps land at t = round(k·100/2) − 1 (the 'trailing' grid).
  errors = distill_fidelity.step_errors(config, str(tmp_path), num=16, seed=config.seed)
  assert [(i, t) for i, t, _, _ in errors] == [(2, 99), (1, 49)]
  assert all(np.isfinite(e) and e >= 0 for row in errors for e in row[2:]) and errors[0][3] > 0, errors
