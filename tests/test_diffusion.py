"""The diffusion math against closed forms, Bayes' rule, a float64 NumPy reference and diffusers' scheduler."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal
from ddpm_jax import diffusion as dlib

T = 1000


def paper_diffusion(**kw):
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T), **kw)


def test_linear_schedule_matches_paper_numbers():
  betas = dlib.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  assert betas.dtype == np.float64 and betas[0] == 1e-4 and betas[-1] == 0.02
  alpha_bar_T = np.prod(1 - betas)
  np.testing.assert_allclose(alpha_bar_T, 4.0358e-5, rtol=1e-4)
  np.testing.assert_allclose(np.sqrt(alpha_bar_T), 0.0063528, rtol=1e-4)
  d = paper_diffusion()
  np.testing.assert_allclose(d.sqrt_alphas_cumprod[-1], 0.0063528, rtol=1e-4)
  assert d.betas.dtype == jnp.float32


@pytest.mark.parametrize("name", dlib.BETA_SCHEDULES)
def test_schedules_are_valid_and_distinct(name):
  betas = dlib.get_beta_schedule(name, num_timesteps=50)
  assert betas.shape == (50,) and np.all(betas > 0) and np.all(betas <= 1)
  if name in ("linear", "quad", "jsd", "cosine"):
    assert np.all(np.diff(betas) > 0)  # these increase strictly
  if name == "jsd":
    np.testing.assert_allclose(betas[-1], 1.0)
    np.testing.assert_allclose(betas[0], 1 / 50)
  if name == "quad":
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(1e-2, math.sqrt(0.02), 50))


def test_unknown_schedule_and_types_raise_one_line_errors():
  with pytest.raises(ValueError, match="Unknown beta schedule 'lin'"):
    dlib.get_beta_schedule("lin")
  betas = dlib.get_beta_schedule("linear", num_timesteps=10)
  for kw, msg in [(dict(model_mean_type="vee"), "model_mean_type"), (dict(model_var_type="big"), "model_var_type"),
                  (dict(loss_type="l1"), "loss_type"),
                  (dict(model_var_type="learned", loss_type="mse"), "cannot train a learned variance"),
                  (dict(loss_type="hybrid"), "needs a learned variance")]:
    with pytest.raises(ValueError, match=msg) as e:
      dlib.GaussianDiffusion(betas, **kw)
    assert "\n" not in str(e.value)


def test_constants_match_float64_reference():
  betas = dlib.get_beta_schedule("linear", num_timesteps=T)
  ac = np.cumprod(1 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  d = paper_diffusion()
  np.testing.assert_allclose(d.alphas_cumprod, ac, rtol=1e-6)
  np.testing.assert_allclose(d.posterior_variance, betas * (1 - ac_prev) / (1 - ac), rtol=1e-6)
  np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ac - 1), rtol=1e-6)


def test_fixed_variances_follow_the_authors():
  d_large, d_small = paper_diffusion(model_var_type="fixedlarge"), paper_diffusion(model_var_type="fixedsmall")
  x = jnp.zeros((3, 2, 2, 1))
  t = jnp.array([0, 1, 999])
  pv = np.asarray(d_large.posterior_variance, np.float64)
  large = d_large.p_mean_variance(x, x, t)
  small = d_small.p_mean_variance(x, x, t)
  betas = dlib.get_beta_schedule("linear", num_timesteps=T)
  # fixed-large: β_t, except at t = 0 where the authors use β̃_1 (β̃_0 = 0 has no log).
  np.testing.assert_allclose(large["variance"][:, 0, 0, 0], [pv[1], betas[1], betas[999]], rtol=1e-5)
  np.testing.assert_allclose(large["log_variance"][:, 0, 0, 0], np.log([pv[1], betas[1], betas[999]]), rtol=1e-5)
  np.testing.assert_allclose(small["variance"][:, 0, 0, 0], [pv[1], pv[1], pv[999]], rtol=1e-5)


def test_q_sample_moments_match_closed_form():
  d = paper_diffusion()
  x0 = jnp.full((20000, 1), 0.7)
  for t_val in (0, 100, 500, 999):
    t = jnp.full((20000,), t_val)
    xt = d.q_sample(x0, t, jax.random.normal(jax.random.PRNGKey(t_val), x0.shape))
    mean, var, logvar = d.q_mean_variance(x0, t)
    np.testing.assert_allclose(jnp.mean(xt), mean[0, 0], atol=4 * math.sqrt(var[0, 0] / 20000))
    np.testing.assert_allclose(jnp.var(xt), var[0, 0], rtol=0.05)
    np.testing.assert_allclose(jnp.exp(logvar), var, rtol=1e-5)


def test_posterior_is_bayes_rule_on_the_two_gaussians():
  # q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): multiply the two Gaussians in x_{t-1} by hand (float64).
  d = paper_diffusion()
  betas = dlib.get_beta_schedule("linear", num_timesteps=T)
  ac = np.cumprod(1 - betas)
  rng = np.random.default_rng(0)
  t = np.array([1, 10, 500, 999])
  x0, xt = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  a_t, ab_prev = (1 - betas[t])[:, None], ac[t - 1][:, None]
  prec = a_t / betas[t][:, None] + 1 / (1 - ab_prev)  # precision of the product in x_{t-1}
  mean = (np.sqrt(a_t) * xt / betas[t][:, None] + np.sqrt(ab_prev) * x0 / (1 - ab_prev)) / prec
  got_mean, got_var, _ = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32),
                                                     jnp.asarray(t))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_var[:, 0], 1 / prec[:, 0], rtol=1e-5)


def test_predict_start_inverts_q_sample():
  d = paper_diffusion()
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 3), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 10, 500, 999])
  xt = d.q_sample(x0, t, eps)
  # At t = 999 errors are amplified ~157× (1/√ᾱ_T), so the tolerance is absolute and loose there.
  np.testing.assert_allclose(d.predict_start_from_noise(xt, t, eps), x0, atol=2e-4)
  x_prev, _, _ = d.q_posterior_mean_variance(x0, xt, t)
  np.testing.assert_allclose(d.predict_start_from_prev(xt, t, x_prev)[:3], x0[:3], atol=1e-4)


def test_v_prediction_recovers_the_data_and_trains_on_v():
  """model_mean_type 'v' (the distilled students): v = √ᾱ ε − √(1 − ᾱ) x0 gives x0 back, and is the loss's target."""
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T), "v")
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 4, 4, 1), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 10, 500, 999])
  ac = np.cumprod(1.0 - dlib.get_beta_schedule("linear", num_timesteps=T).astype(np.float64))[np.asarray(t)]
  v = np.sqrt(ac)[:, None, None, None] * eps - np.sqrt(1.0 - ac)[:, None, None, None] * x0
  xt = d.q_sample(x0, t, eps)
  np.testing.assert_allclose(d.predict_start(xt, t, jnp.asarray(v, jnp.float32)), x0, atol=1e-5)  # no 1/√ᾱ here
  loss, _ = d.training_losses(lambda x, tt: jnp.asarray(v, jnp.float32), x0, t, eps)
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)
  loss, _ = d.training_losses(lambda x, tt: jnp.zeros_like(x), x0, t, eps)
  np.testing.assert_allclose(loss, np.mean(v**2, axis=(1, 2, 3)), rtol=1e-5)


def test_discretized_likelihood_sums_to_one_over_256_bins():
  bins = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
  for mean, log_scale in [(0.0, -1.0), (0.3, -4.0), (-0.99, -2.0), (0.5, 1.0)]:
    logp = dlib.discretized_gaussian_log_likelihood(bins, means=jnp.full_like(bins, mean),
                                                    log_scales=jnp.full_like(bins, log_scale))
    np.testing.assert_allclose(jnp.sum(jnp.exp(logp)), 1.0, rtol=1e-5)


def test_normal_kl_closed_form_and_zero_with_itself():
  m1, lv1, m2, lv2 = 0.3, -1.0, -0.2, 0.5
  v1, v2 = math.exp(lv1), math.exp(lv2)
  expected = math.log(math.sqrt(v2 / v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
  np.testing.assert_allclose(dlib.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-6)
  x = jax.random.normal(jax.random.PRNGKey(0), (100,))
  np.testing.assert_allclose(dlib.normal_kl(x, x * 0.1, x, x * 0.1), 0.0, atol=1e-7)


def test_prior_bpd_closed_form():
  d = paper_diffusion()
  x0 = jnp.full((2, 4, 4, 1), 0.5)
  ab = float(np.prod(1 - dlib.get_beta_schedule("linear", num_timesteps=T)))
  var, mean = 1 - ab, math.sqrt(ab) * 0.5
  expected = 0.5 * (-1 - math.log(var) + var + mean**2) / math.log(2)
  np.testing.assert_allclose(d.prior_bpd(x0), [expected, expected], rtol=1e-4)


def test_training_loss_mse_eps_is_l_simple():
  d = paper_diffusion()
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 1), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 5, 999])
  loss, _ = d.training_losses(lambda x, tt: jnp.zeros_like(x), x0, t, eps)
  np.testing.assert_allclose(loss, jnp.mean(eps**2, axis=(1, 2, 3)), rtol=1e-6)
  # The exact noise gives zero loss.
  exact_eps = lambda xt, tt: (xt - d.q_sample(x0, tt, jnp.zeros_like(x0))) / d.sqrt_one_minus_alphas_cumprod[tt][:, None, None, None]
  loss, _ = d.training_losses(exact_eps, x0, t, eps)
  np.testing.assert_allclose(loss, 0.0, atol=1e-8)


def test_kl_loss_is_small_for_the_true_posterior_and_hybrid_trains_only_the_variance():
  betas = dlib.get_beta_schedule("linear", num_timesteps=T)
  x0 = jnp.round(jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 1), minval=-1, maxval=1) * 127.5) / 127.5
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([3, 700])
  d = dlib.GaussianDiffusion(betas, "xprev", "fixedsmall", "kl")
  true_mean = lambda xt, tt: d.q_posterior_mean_variance(x0, xt, tt)[0]
  loss, terms = d.training_losses(true_mean, x0, t, eps)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)  # same mean and same variance: KL = 0
  wrong, _ = d.training_losses(lambda xt, tt: true_mean(xt, tt) + 0.1, x0, t, eps)
  assert np.all(wrong > 1e-3)

  h = dlib.GaussianDiffusion(betas, "eps", "learned_range", "hybrid")
  def loss_of(scale):
    model_fn = lambda xt, tt: jnp.concatenate([scale * xt, jnp.zeros_like(xt)], axis=-1)
    return jnp.sum(h.training_losses(model_fn, x0, t, eps)[0])
  mse_only = dlib.GaussianDiffusion(betas, "eps", "fixedlarge", "mse")
  grad_hybrid = jax.grad(loss_of)(0.5)
  grad_mse = jax.grad(lambda s: jnp.sum(mse_only.training_losses(lambda xt, tt: s * xt, x0, t, eps)[0]))(0.5)
  np.testing.assert_allclose(grad_hybrid, grad_mse, rtol=1e-5)  # the VLB adds nothing to the mean's gradient


def test_learned_range_interpolates_between_the_fixed_log_variances():
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T), "eps", "learned_range", "hybrid")
  x = jnp.zeros((1, 2, 2, 1))
  t = jnp.array([400])
  for v, expected in [(1.0, np.log(d.betas[400])), (-1.0, d.posterior_log_variance_clipped[400])]:
    out = d.p_mean_variance(jnp.concatenate([x, jnp.full_like(x, v)], -1), x, t)
    np.testing.assert_allclose(out["log_variance"], expected, rtol=1e-6)


def test_every_table2_cell_is_expressible():
  betas = dlib.get_beta_schedule("linear", num_timesteps=T)
  cells = [("xprev", "learned", "kl"), ("xprev", "fixedlarge", "kl"), ("xprev", "fixedsmall", "kl"),
           ("xprev", "fixedlarge", "mse"), ("eps", "learned", "kl"), ("eps", "fixedlarge", "kl"),
           ("eps", "fixedsmall", "kl"), ("eps", "fixedlarge", "mse")]
  x0 = jnp.zeros((2, 4, 4, 1))
  for mean_type, var_type, loss_type in cells:
    d = dlib.GaussianDiffusion(betas, mean_type, var_type, loss_type)
    out_ch = 2 if d.learns_variance else 1
    loss, _ = d.training_losses(lambda x, t: jnp.zeros(x.shape[:-1] + (out_ch,)), x0, jnp.array([0, 500]), x0)
    assert loss.shape == (2,) and np.all(np.isfinite(loss))


def test_calc_bpd_loop_sums_terms_and_visits_every_t():
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=0.2, num_timesteps=20))
  x0 = jnp.round(jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 1), minval=-1, maxval=1) * 127.5) / 127.5
  seen = []
  def model_fn(x, t):
    seen.append(t)
    return jnp.zeros_like(x)
  out = jax.jit(lambda x: d.calc_bpd_loop(model_fn, x, jax.random.PRNGKey(3)))(x0)
  assert out["terms_bpd"].shape == (2, 20) and out["mse_bt"].shape == (2, 20)
  np.testing.assert_allclose(out["total_bpd"], out["terms_bpd"].sum(1) + out["prior_bpd"], rtol=1e-6)
  # Term t recomputed by hand from the same noise: the scan stored each t at its own index.
  for t_val in (0, 7, 19):
    t = jnp.full((2,), t_val)
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), t_val), x0.shape)
    xt = d.q_sample(x0, t, noise)
    vb, _ = d.vb_terms_bpd(jnp.zeros_like(x0), x0, xt, t, clip_denoised=True)
    np.testing.assert_allclose(out["terms_bpd"][:, t_val], vb, rtol=1e-5)
  assert len(seen) == 1  # traced once: a scan, not a Python loop


def test_diffusion_is_a_pytree_through_jit_and_scan():
  d = paper_diffusion(model_var_type="fixedsmall")
  leaves, treedef = jax.tree_util.tree_flatten(d)
  assert all(l.dtype == jnp.float32 for l in leaves)
  d2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert d2.model_var_type == "fixedsmall" and d2.num_timesteps == T
  # Through jit its tables are arguments, not constants: another diffusion of the same kind reuses the trace and
  # gets its own result.
  traces, x = [], jnp.ones((1, 2))
  def q_sample_at_999(dd, x):
    traces.append(1)
    return dd.q_sample(x, jnp.array([999]), x)
  f = jax.jit(q_sample_at_999)
  other = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=0.05, num_timesteps=T),
                                 model_var_type="fixedsmall")
  for dd in (d, other):
    np.testing.assert_allclose(f(dd, x), dd.q_sample(x, jnp.array([999]), x), rtol=1e-6)
  assert len(traces) == 1 and not np.allclose(f(d, x), f(other, x))
  # Through lax.scan as the carry: it comes out as it went in, and every step computed with it.
  ts = jnp.array([0, 500, 999])
  carried, xs = jax.lax.scan(lambda dd, t: (dd, dd.q_sample(x, t[None], x)), d, ts)
  assert_trees_equal(carried, d)
  assert carried.model_var_type == "fixedsmall"
  np.testing.assert_allclose(xs, jnp.stack([d.q_sample(x, t[None], x) for t in ts]), rtol=1e-6)


# ---- parity with diffusers' DDPMScheduler (PyTorch) ----

def _scheduler(variance_type):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                 variance_type=variance_type, clip_sample=True, clip_sample_range=1.0,
                                 prediction_type="epsilon")


def test_add_noise_matches_diffusers():
  import torch
  sched = _scheduler("fixed_small")
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, size=(6, 4, 4, 3)).astype(np.float32)
  eps = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 1, 2, 100, 500, 999])
  ours = np.asarray(paper_diffusion().q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps)))
  # float64 reference from the scheduler's own betas: our float32 math must be within 1e-6
  # (docs/reference.md, Numerical tolerances).
  ab = np.cumprod(1 - sched.betas.double().numpy())[t][:, None, None, None]
  np.testing.assert_allclose(ours, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-6)
  theirs = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("variance_type,ours_type", [("fixed_small", "fixedsmall"), ("fixed_large", "fixedlarge")])
def test_one_ancestral_step_matches_diffusers(variance_type, ours_type):
  import torch
  sched = _scheduler(variance_type)
  sched.set_timesteps(T)
  d = paper_diffusion(model_var_type=ours_type)
  rng = np.random.default_rng(1)
  for t_val in (999, 500, 10, 1):
    xt = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    eps_pred = rng.normal(size=xt.shape).astype(np.float32)
    noise = rng.normal(size=xt.shape).astype(np.float32)
    t = jnp.full((2,), t_val)
    ours, _ = d.p_sample(jnp.asarray(eps_pred), jnp.asarray(xt), t, jnp.asarray(noise))
    # float64 reference from the scheduler's betas: the posterior mean of the clipped x̂0 plus σ_t·noise.
    b = sched.betas.double().numpy()
    ab = np.cumprod(1 - b)
    x0_hat = np.clip((xt - np.sqrt(1 - ab[t_val]) * eps_pred) / np.sqrt(ab[t_val]), -1, 1)
    coef1 = b[t_val] * np.sqrt(ab[t_val - 1]) / (1 - ab[t_val])
    coef2 = (1 - ab[t_val - 1]) * np.sqrt(1 - b[t_val]) / (1 - ab[t_val])
    var = b[t_val] if ours_type == "fixedlarge" else b[t_val] * (1 - ab[t_val - 1]) / (1 - ab[t_val])
    ref = coef1 * x0_hat + coef2 * xt + np.sqrt(var) * noise
    np.testing.assert_allclose(ours, ref, atol=1e-6 * max(1, np.abs(ref).max()))
    # diffusers' own float32 step draws its noise from a generator: replay the same draw for our step.
    gen = torch.Generator().manual_seed(t_val)
    their_noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t_val)).numpy()
    theirs = sched.step(torch.from_numpy(eps_pred), t_val, torch.from_numpy(xt), generator=gen).prev_sample.numpy()
    ours_same_noise, _ = d.p_sample(jnp.asarray(eps_pred), jnp.asarray(xt), t, jnp.asarray(their_noise))
    np.testing.assert_allclose(ours_same_noise, theirs, atol=1e-4)
