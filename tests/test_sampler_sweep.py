"""--mode=sweep: FID against sampling steps on a tiny trained model, checked against FIDs recomputed from the samples."""
import csv
import json
import os
import re

import numpy as np
from PIL import Image
import pytest

from ddpm_jax import sampling
from ddpm_jax.modes import train
from ddpm_jax import trained_params
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import inception
from ddpm_jax.evaluation import inception_weights
from ddpm_jax.evaluation import samples
from ddpm_jax.modes import evaluate as evaluate_mode
from ddpm_jax.modes import sweep as sweep_mode
from ddpm_jax.sampler import Sampler
from conftest import digits_npz, needs_weights, npz_config


@needs_weights
def test_sweep_measures_every_pair_and_reuses_eval_samples(tmp_path, monkeypatch):
  monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path / "cache"))
  # Ancestral only, to keep the test short (each pair compiles its own chain); DDIM pairs differ only in config,
  # which test_pair_configs_leave_the_users_config_alone checks.
  config = npz_config(tmp_path / "digits.npz", num_samples=16, inception_batch_size=16, bpd_num_examples=0,
                       figures=False, sweep_methods=("ancestral",), sweep_steps=(20, 2))
  config.training.num_train_steps = config.training.checkpoint_every_steps = 20
  digits_npz(tmp_path / "digits.npz", 24)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  rows = sweep_mode.run(config, workdir)

  assert [(r["method"], r["steps"], r["eta"]) for r in rows] == [("ancestral", 2, None), ("ancestral", 20, None)]
  eval_dir = os.path.join(workdir, "eval")
  # All T ancestral steps is --mode=eval's paper chain: the same directory, no sampler tag.
  assert rows[0]["samples"] == os.path.join(eval_dir, "samples_step_00000020_ancestral2")
  assert rows[1]["samples"] == os.path.join(eval_dir, "samples_step_00000020")

  # Every FID again, from the sample files, Inception and the cached reference statistics directly.
  feature_fn = inception.make_feature_fn(
      inception_weights.load_inception_params(inception_weights.default_weights_path()))
  ref_mu, ref_sigma = fid.load_stats(os.path.join(eval_dir, "ref_stats_digits_all.npz"))
  for r in rows:
    drawn = samples.load_samples(r["samples"])
    assert drawn.shape == (16, 8, 8, 1)
    mu, sigma = fid.stats_from_features(fid.compute_features(feature_fn, [drawn], 16)["pool_3"])
    assert r["fid"] == pytest.approx(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma), rel=1e-4)
  assert abs(rows[0]["fid"] - rows[1]["fid"]) > 1e-3  # two samplers, two different sets of samples

  prefix = os.path.join(eval_dir, "sweep_step_00000020")
  with open(prefix + ".json") as f:
    assert json.load(f) == rows
  with open(prefix + ".csv") as f:
    table = list(csv.DictReader(f))
  assert [(t["method"], int(t["steps"]), t["eta"]) for t in table] == [("ancestral", 2, ""), ("ancestral", 20, "")]
  np.testing.assert_allclose([float(t["fid"]) for t in table], [r["fid"] for r in rows], rtol=1e-5)
  width, height = Image.open(prefix + ".png").size
  assert width == 1300 and height >= 400

  # A rerun samples nothing: every pair's shards are on disk.
  def no_sampling(*args, **kwargs):
    raise AssertionError("a finished pair was sampled again")
  monkeypatch.setattr(sampling, "sample_sharded", no_sampling)
  again = sweep_mode.run(config, workdir)
  assert [r["fid"] for r in again] == [r["fid"] for r in rows]


@pytest.mark.parametrize("field, value, message", [
    ("sweep_steps", (10, 0), "eval.sweep_steps has 0; each must be an integer from 1 to T = 20"),
    ("sweep_steps", (21,), "eval.sweep_steps has 21"),
    ("sweep_steps", (2.5,), "eval.sweep_steps has 2.5"),
    ("sweep_methods", ("ddim", "ddpm"), "eval.sweep_methods has 'ddpm'; choose from"),
    ("sweep_methods", (), "at least one value"),
    ("num_samples", 0, "eval.num_samples must be > 0"),
])
def test_sweep_refuses_bad_settings_before_sampling(tmp_path, field, value, message):
  config = npz_config(tmp_path / "digits.npz", **{field: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    sweep_mode.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # nothing was loaded, sampled or written


def test_pair_configs_leave_the_users_config_alone(tmp_path):
  config = npz_config(tmp_path / "digits.npz", sweep_methods=("ancestral", "ddim"), sweep_steps=(5, 20))
  config.sampling.eta = 0.5
  configs = [sweep_mode.pair_config(config, m, n) for m, n in sweep_mode.pairs(config)]
  assert [(c.sampling.method, c.sampling.num_steps) for c in configs] == [
      ("ancestral", 5), ("ancestral", 0), ("ddim", 5), ("ddim", 20)]
  assert all(c.eval.bpd_num_examples == 0 and not c.eval.figures and c.sampling.eta == 0.5 for c in configs)
  assert config.sampling.method == "ancestral" and config.sampling.num_steps == 0
  assert config.eval.bpd_num_examples == 64 and config.eval.figures  # untouched
  assert [Sampler.from_config(c.sampling).tag(c.diffusion.num_timesteps) for c in configs] == ["_ancestral5", "", "_ddim5_eta0.5", "_ddim20_eta0.5"]


def test_write_tables_and_figure_for_both_samplers(tmp_path):
  rows = []
  for k, (method, steps, eta) in enumerate([("ddim", 10, 0.0), ("ddim", 100, 0.0), ("ancestral", 10, None)]):
    sample_dir = tmp_path / f"samples_{k}"
    sample_dir.mkdir()
    np.savez(sample_dir / "samples_00000_host0.npz", arr_0=np.full((5, 8, 8, 1), 40 * k, np.uint8))
    rows.append(dict(method=method, steps=steps, eta=eta, fid=100.0 - k, num_samples=5, samples=str(sample_dir),
                     checkpoint_step=7))
  sweep_mode.write(rows, str(tmp_path / "sweep"))
  with open(tmp_path / "sweep.csv") as f:
    assert f.read().splitlines() == ["method,eta,steps,fid,num_samples", "ddim,0.0,10,100,5", "ddim,0.0,100,99,5",
                                     "ancestral,,10,98,5"]
  figure = np.asarray(Image.open(tmp_path / "sweep.png"))
  assert figure.shape[1] == 1300 and figure.std() > 10  # drawn, not blank


def test_the_sweep_loads_the_params_once_and_measures_every_pair_on_them(tmp_path, monkeypatch):
  """A checkpoint written by a training run while the sweep runs cannot mix two steps: the params are loaded once."""
  config = npz_config(tmp_path / "digits.npz", sweep_methods=("ddim",), sweep_steps=(5, 10))
  loads, measured = [], []

  def fake_load(config, workdir):
    loads.append(workdir)
    return "model", "params of step 100", 100

  def fake_evaluate_params(pair_config, workdir, model, params, step, weights):
    measured.append((pair_config.sampling.num_steps, params, step))
    return dict(checkpoint_step=step, fid=dict(value=1.0, num_samples=4, samples="unused"))
  monkeypatch.setattr(trained_params, "load", fake_load)
  monkeypatch.setattr(evaluate_mode, "evaluate_params", fake_evaluate_params)
  monkeypatch.setattr(inception_weights, "default_weights_path", lambda: "inception.pt")
  monkeypatch.setattr(sweep_mode, "write", lambda rows, prefix: None)
  rows = sweep_mode.run(config, str(tmp_path / "run"))
  assert loads == [str(tmp_path / "run")]
  assert measured == [(5, "params of step 100", 100), (10, "params of step 100", 100)]
  assert [r["checkpoint_step"] for r in rows] == [100, 100]
