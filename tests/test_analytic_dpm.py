"""Analytic-DPM's variances against closed forms: on Gaussian data the true reverse step of a respaced chain is
Gaussian with a known variance, which the optimal variance must equal; and its chain is the ancestral one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import analytic_dpm
from ddpm_jax import diffusion as dlib
from ddpm_jax import respacing
from ddpm_jax import sampling
from ddpm_jax.sampler import Sampler

T = 1000
DATA_STD = 0.5
NUM_STEPS = 10


def paper_diffusion(var_type="fixedlarge"):
  loss = "hybrid" if var_type == "learned_range" else "mse"
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T), "eps", var_type, loss)


def float64_alphas_cumprod(kept):
  return np.cumprod(1.0 - dlib.get_beta_schedule("linear", num_timesteps=T).astype(np.float64))[kept]


def gaussian_eps(diffusion):
  """The exact ε-model E[ε | x_t] of data N(0, DATA_STD² I): √(1 − ᾱ_t) x_t / (ᾱ_t DATA_STD² + 1 − ᾱ_t)."""
  def eps(x, t):
    ac = diffusion.alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(1.0 - ac) * x / (ac * DATA_STD**2 + 1.0 - ac)
  return eps


def test_optimal_variances_equal_the_true_reverse_variances_on_gaussian_data():
  kept = respacing.chain_timesteps(T, NUM_STEPS)
  ac = float64_alphas_cumprod(kept)
  v = ac * DATA_STD**2 + 1.0 - ac  # Var(x_t) per dimension
  gamma = (1.0 - ac) / v  # E‖E[ε | x_t]‖²/d
  # x_s and x_t (s the step before t; s = data at the first step) are jointly Gaussian: Cov = √(ᾱ_t/ᾱ_s) Var(x_s).
  ac_s = np.append(1.0, ac[:-1])
  v_s = ac_s * DATA_STD**2 + 1.0 - ac_s
  true_variance = v_s - (ac / ac_s) * v_s**2 / v
  got = analytic_dpm.optimal_variances(paper_diffusion(), kept, gamma, data_half_range=None)
  np.testing.assert_allclose(got, true_variance, rtol=2e-5)
  spaced, _ = respacing.respaced(paper_diffusion(), NUM_STEPS)
  # And they are not the paper's: β̃ is too small and β too large for steps this long.
  assert np.all(got[1:] > np.asarray(spaced.posterior_variance, np.float64)[1:])
  assert np.all(got[1:] < np.asarray(spaced.betas, np.float64)[1:])


def test_noise_norms_estimate_the_expected_squared_noise_prediction():
  d = paper_diffusion()
  kept = respacing.chain_timesteps(T, NUM_STEPS)
  data = DATA_STD * np.random.default_rng(0).standard_normal((4, 64, 8, 8, 1)).astype(np.float32)
  got = analytic_dpm.noise_norms(gaussian_eps(d), d, kept, list(data), jax.random.PRNGKey(0))
  ac = float64_alphas_cumprod(kept)
  # 256 examples × 64 dimensions per t: a relative standard error of about 1%.
  np.testing.assert_allclose(got, (1.0 - ac) / (ac * DATA_STD**2 + 1.0 - ac), rtol=0.05)


def test_estimates_outside_the_bounds_are_clipped_to_them():
  d, kept = paper_diffusion(), respacing.chain_timesteps(T, NUM_STEPS)
  ac = float64_alphas_cumprod(kept)
  ac_s = np.append(1.0, ac[:-1])
  beta_tilde = (1.0 - ac_s) / (1.0 - ac) * (1.0 - ac / ac_s)
  coef_x0 = np.sqrt(ac_s) * (1.0 - ac / ac_s) / (1.0 - ac)
  gamma = np.random.default_rng(1).uniform(-1.0, 3.0, NUM_STEPS)
  got = analytic_dpm.optimal_variances(d, kept, gamma)
  # Var(x_0 | x_t) lies in [0, 1] for data in [-1, 1]: σ*² in [β̃, β̃ + c²].
  assert np.all(got >= beta_tilde * (1 - 1e-6)) and np.all(got <= (beta_tilde + coef_x0**2) * (1 + 1e-6))
  np.testing.assert_allclose(analytic_dpm.optimal_variances(d, kept, np.full(NUM_STEPS, 2.0)), beta_tilde,
                             rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(analytic_dpm.optimal_variances(d, kept, np.zeros(NUM_STEPS))[-1],
                             beta_tilde[-1] + coef_x0[-1]**2, rtol=1e-6)  # at t = T − 1, (1 − ᾱ)/ᾱ > 1


def test_the_chain_is_the_ancestral_chain_with_the_analytic_variances():
  """Γ = 1 makes σ*² = β̃: then the chain is the respaced ancestral chain of a 'fixedsmall' diffusion, draw for
  draw; other Γ change only the noise scale of each step."""
  eps = lambda x, t: 0.8 * jnp.tanh(x)
  rng, shape = jax.random.PRNGKey(2), (4, 8, 8, 1)
  # Compiled, with the diffusion closed over (as every driver runs a chain).
  run = lambda d, **kw: jax.jit(lambda r: sampling.sample_loop(eps, d, r, shape, num_steps=NUM_STEPS, **kw))(rng)
  small = run(paper_diffusion("fixedsmall"))
  np.testing.assert_allclose(run(paper_diffusion(), method="analytic_dpm", gamma=(1.0,) * NUM_STEPS), small,
                             rtol=1e-5, atol=1e-5)
  other = run(paper_diffusion(), method="analytic_dpm", gamma=(0.5,) * NUM_STEPS)
  assert np.abs(np.asarray(other) - np.asarray(small)).max() > 1e-2


def test_fit_estimates_at_the_samplers_timesteps_and_the_errors_are_one_line():
  d = paper_diffusion()
  source = (np.random.default_rng(3).integers(0, 256, (40, 8, 8, 1))).astype(np.uint8)
  sampler = Sampler(method="analytic_dpm", num_steps=4, spacing="trailing")
  fitted = analytic_dpm.fit(sampler, gaussian_eps(d), d, source, num_examples=24, batch_size=16, seed=0)
  assert len(fitted.gamma) == 4 and fitted.tag(T) == "_analytic_dpm4_trailing"
  assert fitted.chain_kwargs()["gamma"] == fitted.gamma and all(0 < g < 1.5 for g in fitted.gamma)
  np.testing.assert_array_equal(sampler.timesteps(T), respacing.chain_timesteps(T, 4, "trailing"))
  cases = [
      (lambda: sampling.sample_loop(gaussian_eps(d), d, jax.random.PRNGKey(0), (1, 8, 8, 1), num_steps=4,
                                    method="analytic_dpm", gamma=(1.0,) * 3),
       "3 estimates of E‖ε̂‖² for a chain of 4 steps"),
      (lambda: sampling.sample_loop(gaussian_eps(d), paper_diffusion("learned_range"), jax.random.PRNGKey(0),
                                    (1, 8, 8, 1), num_steps=4, method="analytic_dpm", gamma=(1.0,) * 4),
       "this model learns its own"),
      (lambda: list(analytic_dpm.example_batches(source, 0, 8, 0)), "analytic_num_examples must be > 0"),
  ]
  for run, message in cases:
    with pytest.raises(ValueError, match=message) as err:
      run()
    assert "\n" not in str(err.value)
