"""The paper's figures and rate–distortion curve, against closed forms (the exact ε-model of a one-point data set)
and independent recomputations with sample_loop / calc_bpd_loop."""
import csv
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import diffusion as dlib
from ddpm_jax import images
from ddpm_jax import sampling
from ddpm_jax.evaluation import figures

T = 20
H = 8
_POINT = ((20 + 3 * np.arange(64)).reshape(8, 8, 1) / 127.5 - 1.0).astype(np.float32)  # inside (-1, 1): no clipping


def _diffusion(var_type="fixedlarge"):
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T), model_var_type=var_type)


def _exact_eps_apply(sqrt_ac, sqrt_one_minus_ac, x0, x_t, t):
  a = sqrt_ac[t][:, None, None, None]
  b = sqrt_one_minus_ac[t][:, None, None, None]
  return (x_t - a * x0[None]) / b


def _exact_eps(d, point=_POINT, shift=0.0):
  """The true ε of the one-point data set {point + shift}: x̂_0 is exactly that point from any x_t.

  A Partial over arrays, so every point shares the compiled programs (and figures' Partial path is exercised).
  """
  return jax.tree_util.Partial(_exact_eps_apply, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod,
                               jnp.asarray(point + shift, jnp.float32))


def _toy_model(x_t, t):
  """A smooth ε-model whose samples depend on the chain's noise."""
  return 0.5 * jnp.tanh(2.0 * x_t) * (1.0 + t[:, None, None, None].astype(jnp.float32) / T)


def _cells(grid, nrows, ncols, h=H, w=H):
  """Inverse of images.make_grid (pad 1): uint8 [nrows, ncols, h, w, C]."""
  assert grid.shape == (nrows * (h + 1) + 1, ncols * (w + 1) + 1, grid.shape[-1])
  return np.stack([np.stack([grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w]
                             for c in range(ncols)]) for r in range(nrows)])


# ---------------------------------------------------------------------------------------------------------------
# Rate–distortion.

def test_rate_distortion_of_the_exact_model_matches_closed_forms():
  d = _diffusion("fixedlarge")
  x = np.repeat(_POINT[None], 3, axis=0)
  rd = figures.rate_distortion(_exact_eps(d), d, x, jax.random.PRNGKey(0))
  assert rd["t"].tolist() == list(range(T - 1, -1, -1))

  # float64 closed form. The exact mean makes every KL term the variance mismatch alone, β̃_t against the
  # fixed-large β_t (0-indexed t ≥ 1), the same for every x_0 and every noise draw.
  betas = np.linspace(1e-4, 0.02, T)
  ac = np.cumprod(1.0 - betas)
  post = betas[1:] * (1.0 - ac[:-1]) / (1.0 - ac[1:])
  kl = np.concatenate([[0.0], 0.5 * (-1.0 + np.log(betas[1:] / post) + post / betas[1:]) / math.log(2.0)])
  x0 = _POINT.astype(np.float64)
  prior = np.mean(0.5 * (-np.log(1 - ac[-1]) + (1 - ac[-1]) + ac[-1] * x0**2 - 1.0)) / math.log(2.0)
  want = np.array([prior + kl[t + 1:].sum() for t in range(T)])[::-1]  # reverse-step order
  np.testing.assert_allclose(rd["rate_bpd"], want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(rd["prior_bpd"], prior, rtol=1e-4)
  assert rd["rate_bpd"][0] == pytest.approx(prior, rel=1e-4)  # after x_T alone: the prior term only
  assert np.all(np.diff(rd["rate_bpd"]) > 0)  # each step's message costs bits
  # The last entry (t = 0: x_1 received in the paper's indices) is the whole bound but the decoder term.
  assert rd["rate_bpd"][-1] == pytest.approx(rd["total_bpd"] - rd["decoder_bpd"], rel=1e-6)
  # Exact model: x̂_0 is x_0 from every x_t.
  assert np.all(rd["distortion_rmse"] < 1e-2)

  # The ε of a point shifted by 0.1 predicts that point: RMSE 0.1 · 127.5 on the 0–255 scale at every t.
  wrong = figures.rate_distortion(_exact_eps(d, shift=0.1), d, x, jax.random.PRNGKey(0))
  np.testing.assert_allclose(wrong["distortion_rmse"], 12.75, rtol=1e-4)
  assert wrong["rate_bpd"][-1] > rd["rate_bpd"][-1] + 0.1  # and pays for it in the KL terms


def test_rate_distortion_equals_summed_calc_bpd_loop_terms_whatever_the_batching():
  d = _diffusion("fixedsmall")
  model_fn = _exact_eps(d, shift=0.1)
  rng = jax.random.PRNGKey(3)
  x = np.stack([np.clip(_POINT + s, -1, 1) for s in (-0.3, 0.0, 0.2, 0.35, -0.1)])

  # Reference: calc_bpd_loop per example with the documented key fold_in(rng, i), aggregated by hand.
  bound = jax.jit(lambda xi, r: d.calc_bpd_loop(model_fn, xi, r))
  outs = [bound(jnp.asarray(x[i:i + 1]), jax.random.fold_in(rng, i)) for i in range(len(x))]
  terms = np.stack([np.asarray(o["terms_bpd"][0], np.float64) for o in outs])  # [N, T], index t
  prior = np.array([float(o["prior_bpd"][0]) for o in outs])
  mse = np.stack([np.asarray(o["mse_bt"][0], np.float64) for o in outs])
  want_rate = [np.mean(prior + terms[:, t + 1:].sum(axis=1)) for t in range(T - 1, -1, -1)]
  want_dist = [127.5 * math.sqrt(np.mean(mse[:, t])) for t in range(T - 1, -1, -1)]
  assert np.ptp(terms[:, 1:].sum(axis=1)) > 1e-2  # the examples differ, so a mix-up would show

  for batch_size in (None, 2):  # all at once; three batches, the last padded
    rd = figures.rate_distortion(model_fn, d, x, rng, batch_size=batch_size)
    np.testing.assert_allclose(rd["rate_bpd"], want_rate, rtol=1e-5, err_msg=f"batch {batch_size}")
    np.testing.assert_allclose(rd["distortion_rmse"], want_dist, rtol=1e-5, err_msg=f"batch {batch_size}")
    assert rd["rate_bpd"][-1] == pytest.approx(np.mean([float(o["total_bpd"][0]) for o in outs])
                                               - np.mean(terms[:, 0]), rel=1e-5)
    assert rd["num_examples"] == 5
  assert np.all(np.diff(rd["rate_bpd"]) >= 0)
  # This model's x̂_0 is the shifted point from every x_t: the RMSE to each example's x_0 is a constant.
  want = 127.5 * math.sqrt(np.mean((_POINT.astype(np.float64) + 0.1 - x) ** 2))
  np.testing.assert_allclose(rd["distortion_rmse"], want, rtol=1e-4)


class _TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x_t, t, train=False):
    emb = nn.Dense(x_t.shape[-1])(t[:, None].astype(jnp.float32) / T)[:, None, None, :]
    return nn.Conv(x_t.shape[-1], (3, 3))(x_t) + emb


def test_partial_model_fn_passes_params_as_inputs_and_matches_a_closure():
  d = _diffusion()
  model = _TinyNet()
  x = np.stack([_POINT, -_POINT])
  params = [model.init(jax.random.PRNGKey(k), x, jnp.zeros((2,), jnp.int32))["params"] for k in (0, 1)]
  before = figures._bpd_terms._cache_size()  # pylint: disable=protected-access
  got = [figures.rate_distortion(sampling.unet_model_fn(model, p), d, x, jax.random.PRNGKey(0)) for p in params]
  assert figures._bpd_terms._cache_size() == before + 1  # pylint: disable=protected-access  # one compile for both
  closure = lambda x_t, t: model.apply({"params": params[1]}, x_t, t, train=False)
  want = figures.rate_distortion(closure, d, x, jax.random.PRNGKey(0))
  np.testing.assert_allclose(got[1]["rate_bpd"], want["rate_bpd"], rtol=1e-5)  # a closure over the same params
  np.testing.assert_allclose(got[1]["distortion_rmse"], want["distortion_rmse"], rtol=1e-5)
  assert np.max(np.abs(got[0]["rate_bpd"] - got[1]["rate_bpd"])) > 1e-3  # the new params were used, not cached ones


# ---------------------------------------------------------------------------------------------------------------
# Figures.

def test_progressive_generation_shows_the_chain_and_ends_on_sample_loops_sample():
  d = _diffusion()
  rng, shape, frames = jax.random.PRNGKey(1), (3, H, H, 1), 5
  grid = figures.progressive_generation(_toy_model, d, rng, shape, frames)
  cells = _cells(grid, 3, frames)

  final = jax.jit(lambda r: sampling.sample_loop(_toy_model, d, r, shape))(rng)
  np.testing.assert_array_equal(cells[:, -1], images.to_uint8(final))
  # Column j is x̂_0 predicted at t = T − (j + 1)·T/frames = 16, 12, 8, 4; every step recorded, x̂_0 of t is entry
  # T − 1 − t.
  _, rec = jax.jit(lambda r: sampling.sample_loop(_toy_model, d, r, shape, record_every=1))(rng)
  for j, t in enumerate((16, 12, 8, 4)):
    want = images.to_uint8(rec["pred_xstart"][T - 1 - t])
    assert np.max(np.abs(cells[:, j].astype(int) - want)) <= 1, f"column {j} (t = {t})"
    assert np.mean(cells[:, j] == want) > 0.99
  assert np.mean(cells[:, 0] != cells[:, -1]) > 0.2  # the frames change along the chain
  assert np.mean(cells[0, -1] != cells[1, -1]) > 0.2  # and the samples differ

  odd = figures.progressive_generation(_toy_model, d, rng, shape, 6)  # T not divisible: nearest recorded steps
  np.testing.assert_array_equal(_cells(odd, 3, 6)[:, -1], cells[:, -1])


def test_shared_latent_rows_start_many_chains_from_one_x_t():
  d = _diffusion()
  rng, n = jax.random.PRNGKey(2), 3
  x0 = _POINT * 0.8
  ts = (9, 0)
  grid = figures.shared_latent(_toy_model, d, rng, x0, ts=ts, num_samples=n)
  cells = _cells(grid, len(ts), n + 2)

  rng_q, rng_p = jax.random.split(rng)
  ac = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
  for r, t in enumerate(ts):
    np.testing.assert_array_equal(cells[r, 0], images.to_uint8(x0))
    eps = np.asarray(jax.random.normal(jax.random.fold_in(rng_q, t), (1, H, H, 1)), np.float64)[0]
    x_t = math.sqrt(ac[t]) * x0 + math.sqrt(1.0 - ac[t]) * eps  # q(x_t | x_0) in float64
    assert np.max(np.abs(cells[r, 1].astype(int) - images.to_uint8(x_t))) <= 1
    chains = sampling.sample_loop(_toy_model, d, jax.random.fold_in(rng_p, t), (n, H, H, 1),
                                  x_init=jnp.repeat(jnp.asarray(x_t, jnp.float32)[None], n, axis=0), start_t=t)
    assert np.max(np.abs(cells[r, 2:].astype(int) - images.to_uint8(chains))) <= 1
  # Different noise per sample: the chains from t = 9 part ways…
  for i in range(n):
    for k in range(i + 1, n):
      assert np.mean(cells[0, 2 + i] != cells[0, 2 + k]) > 0.2, (i, k)
  # …while the step from t = 0 adds no noise, so chains from one shared x_0 must agree exactly.
  for i in range(1, n):
    np.testing.assert_array_equal(cells[1, 2 + i], cells[1, 2])
  # Default timesteps: the paper's 1000, 750, 500, 250 scaled and 0-indexed.
  assert figures.default_shared_latent_ts(1000) == (999, 749, 499, 249)
  assert figures.default_shared_latent_ts(T) == (19, 14, 9, 4)


def test_interpolate_decodes_mixed_encodings_with_shared_noise():
  d = _diffusion()
  rng, t, points = jax.random.PRNGKey(4), 9, 5
  x_a = np.asarray(jax.random.uniform(jax.random.PRNGKey(10), (H, H, 1), minval=-0.6, maxval=0.6))
  x_b = np.asarray(jax.random.uniform(jax.random.PRNGKey(11), (H, H, 1), minval=-0.6, maxval=0.6))
  grid = figures.interpolate(_toy_model, d, rng, x_a, x_b, t=t, num_points=points)
  cells = _cells(grid, 1, points + 2)[0]
  np.testing.assert_array_equal(cells[0], images.to_uint8(x_a))
  np.testing.assert_array_equal(cells[-1], images.to_uint8(x_b))

  # λ = 0 and λ = 1 decode each image's own encoding, with the documented keys.
  rng_q, rng_p = jax.random.split(rng)
  eps = jax.random.normal(rng_q, (1, H, H, 1))
  decode = jax.jit(lambda x_t: sampling.sample_loop(_toy_model, d, rng_p, (1, H, H, 1), x_init=x_t, start_t=t)[0])
  for col, x in ((1, x_a), (points, x_b)):
    want = decode(d.q_sample(jnp.asarray(x)[None], jnp.full((1,), t, jnp.int32), eps))
    assert np.max(np.abs(cells[col].astype(int) - images.to_uint8(want))) <= 1
  assert np.mean(cells[1] != cells[points]) > 0.2

  # With ε̂ = 0 and no clipping the chain is affine in x_t with noise-dependent offset, so the same noise for every λ
  # makes the decodings the λ-mix of the two ends (independent noise would be off by ~σ·127 levels).
  zero = lambda x_t, t: jnp.zeros_like(x_t)
  lin = _cells(figures.interpolate(zero, d, rng, x_a * 0.5, x_b * 0.5, t=t, num_points=points, clip_denoised=False),
               1, points + 2)[0].astype(float)
  inside = np.all((lin[1:-1] > 0) & (lin[1:-1] < 255), axis=0)
  assert inside.mean() > 0.8
  for j, lam in enumerate(np.linspace(0, 1, points)):
    mix = (1 - lam) * lin[1] + lam * lin[points]
    assert np.max(np.abs(lin[1 + j] - mix)[inside]) <= 1.0 + 1e-9, f"λ = {lam}"

  two = figures.interpolate(_toy_model, d, rng, np.stack([x_a, x_b]), np.stack([x_b, x_a]), t=t, num_points=points)
  assert two.shape == (2 * (H + 1) + 1, (points + 2) * (H + 1) + 1, 1)
  np.testing.assert_array_equal(_cells(two, 2, points + 2)[0], cells)  # pair 0 keeps example index 0's noise
  assert figures.default_interpolation_t(1000) == 499


class _RecordingWriter:
  def __init__(self):
    self.calls = []

  def write_images(self, step, images_by_key):
    self.calls.append((step, images_by_key))


def test_write_figures_writes_pngs_csv_and_summaries(tmp_path):
  d = _diffusion()
  data = images.to_uint8(np.stack([_POINT, -_POINT, _POINT * 0.5, -_POINT * 0.5]))
  writer = _RecordingWriter()
  paths = figures.write_figures(_exact_eps(d, shift=0.05), d, jax.random.PRNGKey(5), data, str(tmp_path), 7,
                                writer, num_samples=2, num_frames=4, num_interpolation_points=3)
  assert set(paths) == {"progressive", "shared_latent", "interpolation", "rate_distortion_csv", "rate_distortion_png"}
  for key in ("progressive", "shared_latent", "interpolation", "rate_distortion_png"):
    assert paths[key].startswith(str(tmp_path)) and paths[key].endswith("_step_00000007.png")
    with Image.open(paths[key]) as img:
      img.verify()
    with Image.open(paths[key]) as img:
      assert img.format == "PNG" and img.width >= 64 and img.height >= 32
  with Image.open(paths["progressive"]) as img:  # 2 samples × 4 frames of 8×8 digits, enlarged to be legible
    grid = images.make_grid(np.zeros((8, H, H, 1), np.uint8), ncols=4)
    scale = img.width // grid.shape[1]
    assert scale > 1 and img.size == (grid.shape[1] * scale, grid.shape[0] * scale)

  with open(paths["rate_distortion_csv"], newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["t", "rate_bpd", "distortion_rmse"]
  assert [int(r[0]) for r in rows[1:]] == list(range(T, 0, -1))  # the paper's t, in reverse-step order
  rate, dist = (np.array([float(r[k]) for r in rows[1:]]) for k in (1, 2))
  rd = figures.rate_distortion(_exact_eps(d, shift=0.05), d, data / 127.5 - 1.0, jax.random.split(
      jax.random.PRNGKey(5), 4)[3])
  np.testing.assert_allclose(rate, rd["rate_bpd"], rtol=1e-6)
  np.testing.assert_allclose(dist, rd["distortion_rmse"], rtol=1e-6)

  assert len(writer.calls) == 1 and writer.calls[0][0] == 7
  summaries = writer.calls[0][1]
  assert set(summaries) == {f"figures/{k}" for k in ("progressive", "shared_latent", "interpolation",
                                                     "rate_distortion")}
  for key, value in summaries.items():
    assert value.dtype == np.uint8 and value.ndim == 4 and value.shape[0] == 1, key
  with pytest.raises(ValueError, match="at least 2 uint8"):
    figures.write_figures(_toy_model, d, jax.random.PRNGKey(5), data[:1], str(tmp_path), 7)
