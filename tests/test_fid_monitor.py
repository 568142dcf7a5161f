"""FID during training: measured every N steps, the best step's EMA params kept across restarts, training untouched."""
import os

import jax
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import fid_monitor
from ddpm_jax import trained_params
from ddpm_jax.modes import sample as sample_mode
from ddpm_jax.modes import train
from conftest import assert_trees_equal, tiny_config

_PROJECTION = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)


def _cheap_feature_fn(self):
  """A fixed function of the pixels instead of Inception (tests/test_evaluate.py runs the real network)."""
  del self
  return lambda batch: {"pool_3": np.tanh(np.asarray(batch, np.float32).reshape(len(batch), -1) @ _PROJECTION / 255)}


def _config(steps):
  config = tiny_config(num_train_steps=steps)
  config.training.fid_every_steps = 2
  config.training.fid_num_samples = 8
  config.training.fid_num_steps, config.training.fid_method = 5, "dpm_solver++"  # any few-step sampler
  return config


def test_best_fid_checkpoint_is_kept_across_restarts_and_training_is_unchanged(tmp_path, monkeypatch):
  monkeypatch.setattr(fid_monitor.FidMonitor, "feature_fn", _cheap_feature_fn)
  measured = []
  fids = iter([5.0, 3.0, 4.0, 3.5])  # steps 2, 4, 6, then 8 after the restart: step 4 stays the best
  def scripted_fid(*args):
    measured.append(args)
    return next(fids)
  monkeypatch.setattr(fid_monitor.fid, "fid_from_features", scripted_fid)

  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(_config(6), workdir)
  assert len(measured) == 3 and all(np.all(np.isfinite(a[0])) for a in measured)  # the samples' real features
  monitor = fid_monitor.FidMonitor(_config(6), workdir, None, None)
  assert (monitor.sampler.method, monitor.sampler.num_steps) == ("dpm_solver++", 5)  # training.fid_method's
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.ema_params)
  best, info = fid_monitor.restore_best(workdir, abstract)
  assert info == dict(fid=3.0, step=4)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  at_4, _ = ckpt._restore_step(4, checkpointing.abstract_like(state))  # pylint: disable=protected-access
  assert_trees_equal(best, at_4.ema_params)

  state_8 = train.train_and_evaluate(_config(8), workdir)  # resumes: 3.5 at step 8 does not beat 3.0 on disk
  assert len(measured) == 4 and fid_monitor.restore_best(workdir, abstract)[1] == dict(fid=3.0, step=4)
  assert sorted(os.listdir(os.path.join(workdir, fid_monitor.BEST_DIR))) == ["4"]

  plain = train.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path / "plain"))
  assert_trees_equal(state_8, plain)  # measuring FID never changes training

  config = _config(8)
  config.sampling.num_samples, config.sampling.num_steps, config.sampling.checkpoint = 8, 3, "best_fid"
  assert sample_mode.run(config, workdir).endswith("samples/step_00000004_ancestral3")


def test_no_best_checkpoint_is_a_one_line_error(tmp_path):
  config = tiny_config()
  config.sampling.checkpoint = "best_fid"
  try:
    trained_params.load(config, str(tmp_path))
  except FileNotFoundError as e:
    assert "no best-FID checkpoint" in str(e) and "training.fid_every_steps > 0" in str(e)
  else:
    raise AssertionError("expected FileNotFoundError")
  config.sampling.checkpoint = "best"
  try:
    trained_params.load(config, str(tmp_path))
  except ValueError as e:
    assert "sampling.checkpoint must be 'latest' or 'best_fid', got 'best'" in str(e)
  else:
    raise AssertionError("expected ValueError")
