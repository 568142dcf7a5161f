"""The train step and loop: device-count invariance, closed forms, exact resumption, learning, bad configs."""
import functools
import glob
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers

from conftest import REPO, assert_trees_equal, max_rel_diff, one_device_env, tiny_config
from ddpm_jax import diffusion as dlib
from ddpm_jax.modes import train
from ddpm_jax import train_step


def step_parts(config):
  model = train_step.create_model(config)
  d = dlib.GaussianDiffusion.from_config(config.diffusion)
  tx, schedule = train_step.create_optimizer(config.optim)
  state = train_step.create_train_state(jax.random.PRNGKey(0), model, tx, (8, 8, 1))
  kw = dict(model=model, diffusion=d, tx=tx, schedule=schedule, ema_decay=config.optim.ema_decay,
            rng=jax.random.PRNGKey(1))
  return state, kw


def moving_config():
  """The tiny config with a non-zero learning rate from step 0 (params move) and an EMA decay of 0.5 (the EMA moves
  half way each step: a decay other than the configured one would show)."""
  config = tiny_config()
  config.optim.warmup_steps = 0
  config.optim.ema_decay = 0.5
  return config


def one_device_step(kw):
  """train_step on one "device" holding the whole batch (vmap supplies the axis), jitted."""
  return jax.jit(jax.vmap(functools.partial(train_step.train_step, **kw), axis_name="batch"))


def test_the_loops_compiled_step_on_8_devices_is_the_configured_step_on_one_device():
  """What the loop runs, pmapped_train_steps(model, optimizer settings) compiled ahead of time over 8 devices, takes
  the step of train_step with the optimizer, schedule and EMA decay made from those settings on one "device" holding
  the whole batch (vmap supplies the axis): the device count changes nothing. The same request again returns the
  same executable, so a second run in a process compiles nothing."""
  config = moving_config()
  state, kw = step_parts(config)
  items = tuple(sorted(config.optim.items()))
  p_step = train_step.pmapped_train_steps(kw["model"], items)
  assert train_step.pmapped_train_steps(kw["model"], items) is p_step
  replicated = flax.jax_utils.replicate(state)
  batch = jax.random.uniform(jax.random.PRNGKey(2), (16, 8, 8, 1), minval=-1, maxval=1)
  # [devices, steps per dispatch, per-device batch, …], and each example's index (which keys its t and ε)
  args = (batch.reshape(8, 1, 2, 8, 8, 1), jnp.arange(16).reshape(8, 2), kw["diffusion"], kw["rng"])
  compiled = train_step.compiled_train_steps(p_step, replicated, *args)
  assert train_step.compiled_train_steps(p_step, replicated, *args) is compiled
  got_state, got_metrics = compiled(jax.tree.map(jnp.copy, replicated), *args)  # donates its state: a copy
  got_state = train_step.unreplicate(got_state)
  want_state, want_metrics = one_device_step(kw)(jax.tree.map(lambda x: x[None], state), batch[None],
                                                 jnp.arange(16)[None])
  want_state = jax.tree.map(lambda x: x[0], want_state)
  assert max_rel_diff(got_state.params, state.params) > 1e-4  # the step did something
  assert int(got_state.step) == int(want_state.step) == 1
  for field in ("params", "ema_params", "opt_state"):  # opt_state: Adam's moments, the averaged gradients
    assert max_rel_diff(getattr(got_state, field), getattr(want_state, field)) <= 1e-6, field
  np.testing.assert_allclose(got_metrics["loss"][0], want_metrics["loss"][0], rtol=1e-6)
  np.testing.assert_allclose(got_metrics["grad_norm"][0], want_metrics["grad_norm"][0], rtol=1e-5)


def test_the_train_step_module_keeps_tensorflow_out():
  """Your own loop (and bench_memory) imports the step alone; TensorFlow (+0.5 GB RSS) comes only with the loop."""
  code = ("import sys; from ddpm_jax import train_step; "
          "print(sorted(m for m in ('tensorflow', 'clu', 'tensorflow_datasets', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]", out


def test_the_loops_writers_come_without_keras_and_tf_keras_still_loads(tmp_path):
  """Keras is ~1 CPU-s and 100 MB of a training process's start-up that nothing uses (tensorflow_cpu.py): the loop's
  writers, hparams included, load without it; tf.keras still works afterwards, and the variable is restored."""
  code = ("import os, sys; from ddpm_jax.modes import train; from configs import digits; "
          f"w = train._open_writer(digits.get_config(), {str(tmp_path)!r}, 0); w.write_scalars(1, dict(x=1.0)); "
          "w.flush(); print('keras' in sys.modules, os.environ.get('TF_USE_LEGACY_KERAS')); "
          "import tensorflow as tf; print(tf.keras.layers.Dense.__name__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(one_device_env(), TF_CPP_MIN_LOG_LEVEL="2"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["False", "None", "Dense"], out.stdout
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))  # the summaries (the config as hparams) were written


def test_warmup_schedule_and_ema_closed_forms():
  config = tiny_config()
  config.optim.warmup_steps = 10
  _, schedule = train_step.create_optimizer(config.optim)
  for step in (0, 1, 5, 10, 11, 1000):
    np.testing.assert_allclose(schedule(step), config.optim.lr * min(step / 10, 1.0), rtol=1e-6)
  config.optim.lr_anneal_steps = 30  # after the warmup, falling linearly to 0 at step 30 (distillation's rounds)
  _, annealed = train_step.create_optimizer(config.optim)
  for step in (0, 5, 10, 11, 20, 29, 30, 31, 1000):
    want = config.optim.lr * (step / 10 if step < 10 else max(30 - step, 0) / 20)
    np.testing.assert_allclose(annealed(step), want, rtol=1e-6, atol=1e-12)
  config.optim.warmup_steps = 0
  _, falling = train_step.create_optimizer(config.optim)
  np.testing.assert_allclose([falling(s) for s in (0, 15, 30)], [config.optim.lr, config.optim.lr / 2, 0], rtol=1e-6)
  config.optim.lr_anneal_steps = 0
  _, constant = train_step.create_optimizer(config.optim)
  assert float(constant(0)) == float(constant(10**6)) == config.optim.lr  # no warmup: full lr from the first step
  # From EMA_0 = 0, each step's EMA is d·EMA_(k−1) + (1 − d)·params_k of the params that step made: after n steps
  # Σ_k (1 − d)·d^(n−k)·params_k. The step of the test above (the same program: compiled once).
  config = moving_config()
  state, kw = step_parts(config)
  state = state.replace(ema_params=jax.tree.map(jnp.zeros_like, state.params))
  step, d = one_device_step(kw), config.optim.ema_decay
  s, want = jax.tree.map(lambda x: x[None], state), jax.tree.map(lambda p: np.zeros(p.shape), state.params)
  batch = jax.random.uniform(jax.random.PRNGKey(2), (1, 16, 8, 8, 1), minval=-1, maxval=1)
  for _ in range(3):
    s, _ = step(s, batch, jnp.arange(16)[None])
    want = jax.tree.map(lambda w, p: d * w + (1 - d) * np.asarray(p[0], np.float64), want, s.params)
    jax.tree.map(lambda e, w: np.testing.assert_allclose(e[0], w, rtol=1e-5, atol=1e-7), s.ema_params, want)
  assert int(s.step[0]) == 3 and max_rel_diff(jax.tree.map(lambda p: p[0], s.params), state.params) > 1e-4


def _run(config, workdir):
  return train.train_and_evaluate(config, str(workdir))


def test_resume_after_stop_is_bit_equal_to_an_uninterrupted_run(tmp_path):
  straight = _run(tiny_config(num_train_steps=4), tmp_path / "straight")
  two = _run(tiny_config(num_train_steps=2), tmp_path / "resumed")
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2"]
  resumed = _run(tiny_config(num_train_steps=4), tmp_path / "resumed")
  assert int(resumed.step) == int(straight.step) == 4
  assert_trees_equal(resumed, straight)
  # And steps 3-4 did train: params moved on from the 2-step state.
  assert max_rel_diff(two.params, straight.params) > 1e-6


def test_loss_falls_on_digits(tmp_path, monkeypatch):
  config = tiny_config(num_train_steps=100, checkpoint_every_steps=0, log_every_steps=10)
  losses = []
  class Recorder(metric_writers.MetricWriter):
    def write_scalars(self, step, scalars):
      if "loss" in scalars:
        losses.append(scalars["loss"])
    write_summaries = write_images = write_videos = write_audios = write_texts = write_histograms = (
        lambda self, *a, **k: None)
    write_hparams = flush = close = lambda self, *a, **k: None
  monkeypatch.setattr(metric_writers, "create_default_writer", lambda *a, **k: Recorder())
  _run(config, tmp_path)
  assert len(losses) == 10
  assert losses[-1] < 0.6 * losses[0], losses  # 0.88 → 0.39 seen


@pytest.mark.parametrize("field,value,msg", [
    ("training.batch_size", 12, "training.batch_size = 12: not divisible by the 8 devices; use a multiple of 8"),
    ("data.image_size", 9, "image size 9 is not divisible by 2\\^1"),
    ("data.source", "cifar100", "source"),
    ("training.steps_per_dispatch", 0, "training.steps_per_dispatch = 0: out of range; use an integer >= 1"),
    ("data.num_threads", 0, "data.num_threads = 0: out of range; use an integer >= 1"),
])
def test_bad_configs_fail_at_start_with_one_line_errors(tmp_path, field, value, msg):
  config = tiny_config(num_train_steps=2)
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises(ValueError, match=msg) as e:
    _run(config, tmp_path)
  assert "\n" not in str(e.value)
  assert not glob.glob(str(tmp_path / "**" / "checkpoints" / "*"), recursive=True)


