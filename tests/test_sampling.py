"""The reverse chain: exactness on a one-point data set, step order, trajectories, and device-count invariance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as dlib
from ddpm_jax import sampling
from ddpm_jax.models import unet

T = 50


def small_diffusion(var_type="fixedlarge"):
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=0.2, num_timesteps=T),
                                model_var_type=var_type)


def exact_eps_for(d, point):
  """The true ε-predictor of a data set holding the single image `point`."""
  def model_fn(x_t, t):
    # √(1 − ᾱ) from the float64-derived table: 1 − ᾱ in float32 loses digits at small t.
    return ((x_t - d.sqrt_alphas_cumprod[t][:, None, None, None] * point)
            / d.sqrt_one_minus_alphas_cumprod[t][:, None, None, None])
  return model_fn


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_chain_with_exact_eps_returns_the_data_point(var_type):
  d = small_diffusion(var_type)
  point = jnp.linspace(-0.9, 0.9, 16 * 3).reshape(1, 4, 4, 3)
  out = jax.jit(lambda r: sampling.sample_loop(exact_eps_for(d, point), d, r, (5, 4, 4, 3)))(jax.random.PRNGKey(0))
  np.testing.assert_allclose(out, jnp.broadcast_to(point, out.shape), atol=1e-5)
  # The ε of another point leads elsewhere (the test can fail).
  bad = sampling.sample_loop(exact_eps_for(d, point * 0.5), d, jax.random.PRNGKey(0), (5, 4, 4, 3))
  assert np.abs(bad - point).max() > 0.3


def test_chain_visits_every_t_once_in_order_and_never_T():
  d = small_diffusion()
  seen, traces = [], []
  def model_fn(x_t, t):
    traces.append(1)
    jax.debug.callback(lambda tt: seen.append(int(tt[0])), t, ordered=True)
    return jnp.zeros_like(x_t)
  jax.jit(lambda r: sampling.sample_loop(model_fn, d, r, (2, 4, 4, 1)))(jax.random.PRNGKey(0)).block_until_ready()
  jax.effects_barrier()
  assert seen == list(range(T - 1, -1, -1))
  assert len(traces) == 1  # one traced step inside a scan: no Python loop over timesteps


def test_no_noise_at_the_last_step_and_start_midway():
  d = small_diffusion()
  x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  model_fn = lambda x, t: 0.3 * x
  # Starting at t = 0 runs exactly one step, which is the posterior mean with no noise.
  out = sampling.sample_loop(model_fn, d, jax.random.PRNGKey(2), x1.shape, x_init=x1, start_t=0)
  expected = d.p_mean_variance(model_fn(x1, jnp.zeros(3, jnp.int32)), x1, jnp.zeros(3, jnp.int32))["mean"]
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  # Starting at t = 1 adds noise once (at t = 1), so two keys give different results.
  a = sampling.sample_loop(model_fn, d, jax.random.PRNGKey(2), x1.shape, x_init=x1, start_t=1)
  b = sampling.sample_loop(model_fn, d, jax.random.PRNGKey(3), x1.shape, x_init=x1, start_t=1)
  assert not np.allclose(a, b)
  with pytest.raises(ValueError, match="start_t must be in"):
    sampling.sample_loop(model_fn, d, jax.random.PRNGKey(2), x1.shape, x_init=x1, start_t=T)


@pytest.mark.parametrize("every", [10, 7])
def test_trajectory_recording_does_not_change_the_sample(every):
  d = small_diffusion()
  model_fn = lambda x, t: jnp.tanh(x) * (t[:, None, None, None] / T)
  plain = sampling.sample_loop(model_fn, d, jax.random.PRNGKey(0), (2, 4, 4, 1))
  final, traj = sampling.sample_loop(model_fn, d, jax.random.PRNGKey(0), (2, 4, 4, 1), record_every=every)
  n = -(-T // every)
  np.testing.assert_allclose(final, plain, rtol=1e-6)
  assert traj["x_t"].shape == (n, 2, 4, 4, 1) and traj["pred_xstart"].shape == (n, 2, 4, 4, 1)
  np.testing.assert_allclose(traj["x_t"][-1], plain, rtol=1e-6)
  # Recorded after t = (n−1)·every, …, every, 0: padding, if any, sits before the first real step.
  np.testing.assert_array_equal(traj["t"], every * np.arange(n - 1, -1, -1))


def test_samples_do_not_depend_on_how_the_batch_is_split():
  d = small_diffusion()
  model_fn = lambda x, t: 0.5 * x
  full = sampling.sample_loop(model_fn, d, jax.random.PRNGKey(7), (8, 4, 4, 1))
  half = sampling.sample_loop(model_fn, d, jax.random.PRNGKey(7), (4, 4, 4, 1), first_index=4)
  np.testing.assert_allclose(half, full[4:], rtol=1e-6)
  assert not np.allclose(full[:4], full[4:])  # different examples get different noise


def test_pmapped_sampling_on_8_devices_equals_one_device():
  assert jax.local_device_count() == 8, "tests run with 8 virtual CPU devices (tests/conftest.py)"
  d = small_diffusion()
  model = unet.UNetTiny(out_ch=1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p + 0.01, params)  # make the output non-trivial
  rng = jax.random.PRNGKey(3)
  one = jax.jit(lambda p: sampling.sample_loop(sampling.unet_model_fn(model, p), d, rng, (8, 8, 8, 1)))(params)
  replicated = jax.tree.map(lambda p: jnp.broadcast_to(p, (8,) + p.shape), params)
  many = sampling.sample_sharded(model, replicated, d, rng, 8, (8, 8, 8, 1)[1:])
  np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_samples = 12: not divisible by the 8 local devices"):
    sampling.sample_sharded(model, replicated, d, rng, 12, (8, 8, 1))
