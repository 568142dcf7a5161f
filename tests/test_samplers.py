"""Faster sampling: respaced timesteps and DDIM — exactness against float64 NumPy, diffusers, and the full chain."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers import DDPMScheduler

from conftest import tiny_config
from ddpm_jax import analytic_dpm
from ddpm_jax import diffusion as dlib
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import respacing
from ddpm_jax import sampling
from ddpm_jax import train_step
from ddpm_jax.evaluation import samples
from ddpm_jax.modes import sample as sample_mode
from ddpm_jax.modes import train
from ddpm_jax.sampler import Sampler

T = 50
SHAPE = (4, 4, 4, 1)


@functools.lru_cache(maxsize=None)  # one object per kind, so `sample` below compiles once per configuration
def make_diffusion(var_type="fixedlarge", mean_type="eps", beta_end=0.2):
  loss = "hybrid" if var_type in ("learned", "learned_range") else "mse"
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=beta_end, num_timesteps=T),
                                mean_type, var_type, loss)


def analytic_eps(x, t, xp=jnp):
  """A smooth stand-in for a network's ε; t is [B] (JAX) or a scalar (NumPy reference)."""
  scale = (t[:, None, None, None] if xp is jnp else t) / T
  return 0.8 * xp.tanh(x) + 0.3 * scale * xp.sin(3.0 * x)


@functools.partial(jax.jit, static_argnames=("model_fn", "d", "num_steps", "method", "eta", "clip", "start_t"))
def sample(rng, x_init=None, *, model_fn=analytic_eps, d, num_steps=None, method="ancestral", eta=1.0, clip=True,
           start_t=None):
  """sample_loop on SHAPE, compiled once per static configuration (rng and x_init are traced)."""
  return sampling.sample_loop(model_fn, d, rng, SHAPE, x_init=x_init, num_steps=num_steps, method=method, eta=eta,
                              clip_denoised=clip, start_t=start_t)


def x_T(batch=SHAPE[0], seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch,) + SHAPE[1:])


def test_spaced_timesteps_are_even_distinct_and_hold_both_ends():
  np.testing.assert_array_equal(respacing.spaced_timesteps(T, 8), np.arange(0, T, 7))
  np.testing.assert_array_equal(respacing.spaced_timesteps(T, 10), np.round(np.linspace(0, T - 1, 10)))
  np.testing.assert_array_equal(respacing.spaced_timesteps(4, 3), [0, 2, 3])  # 1.5 rounds up, never to a duplicate
  np.testing.assert_array_equal(respacing.spaced_timesteps(T, 1), [T - 1])
  np.testing.assert_array_equal(respacing.spaced_timesteps(T, T), np.arange(T))
  for total in (7, 50, 1000):
    for n in range(2, total + 1, max(1, total // 97)):
      k = respacing.spaced_timesteps(total, n)
      assert len(k) == n and k[0] == 0 and k[-1] == total - 1 and np.all(np.diff(k) > 0), (total, n)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_alphas_cumprod_equal_the_original_at_the_kept_steps(schedule):
  betas = dlib.get_beta_schedule(schedule, num_timesteps=1000)
  alphas_cumprod = np.cumprod(1.0 - betas)  # float64 reference
  d = dlib.GaussianDiffusion(betas)
  for n in (1, 2, 10, 250, 999):
    spaced, kept = respacing.respaced(d, n)
    assert spaced.num_timesteps == n and spaced.model_var_type == d.model_var_type
    np.testing.assert_allclose(spaced.alphas_cumprod, alphas_cumprod[kept], rtol=1e-6, atol=0)
    np.testing.assert_allclose(spaced.one_minus_alphas_cumprod, 1.0 - alphas_cumprod[kept], rtol=1e-6, atol=0)
    if n > 1:  # the betas really changed (not the original ones at the kept steps)
      assert np.abs(np.asarray(spaced.betas)[1:] - betas[kept][1:]).max() > 10 * betas.min()
  same, kept = respacing.respaced(d, 1000)
  assert same is d
  np.testing.assert_array_equal(kept, np.arange(1000))


def test_all_T_steps_equals_the_full_chain():
  d = make_diffusion()
  full = sampling.sample_loop(analytic_eps, d, jax.random.PRNGKey(0), SHAPE)  # the existing call
  np.testing.assert_allclose(sample(jax.random.PRNGKey(0), d=d, num_steps=T), full, rtol=1e-6, atol=1e-6)
  assert np.abs(sample(jax.random.PRNGKey(0), d=d, num_steps=T - 1) - full).max() > 1e-3  # can fail


def test_respaced_chain_calls_the_network_with_original_t_and_keys_noise_by_it():
  d = make_diffusion()
  spaced, kept = respacing.respaced(d, 10)
  seen = []
  def model_fn(x_t, t):
    jax.debug.callback(lambda tt: seen.append(int(tt[0])), t, ordered=True)
    return analytic_eps(x_t, t)
  rng = jax.random.PRNGKey(5)
  out = jax.jit(lambda r: sampling.sample_loop(model_fn, d, r, SHAPE, num_steps=10))(rng)
  jax.effects_barrier()
  assert seen == list(kept[::-1])
  # Reference: a plain Python loop over the respaced chain with the documented per-example keys.
  idx = jnp.arange(SHAPE[0])
  x = sampling.per_example_normal(rng, idx, T, SHAPE[1:])
  for i in range(9, -1, -1):
    t = jnp.full((SHAPE[0],), kept[i], jnp.int32)
    noise = sampling.per_example_normal(rng, idx, kept[i], SHAPE[1:])
    x, _ = spaced.p_sample(analytic_eps(x, t), x, jnp.full((SHAPE[0],), i, jnp.int32), noise)
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)
  # Trajectories record after every k-th respaced step, labelled with the original t.
  final, traj = sampling.sample_loop(analytic_eps, d, rng, SHAPE, num_steps=10, record_every=4)
  np.testing.assert_allclose(final, x, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(traj["t"], kept[[8, 4, 0]])


def numpy_ddim(x, num_steps, clip):
  """DDIM η = 0 in float64 NumPy, written from the paper (eq. 12), over np.linspace-rounded timesteps."""
  alphas_cumprod = np.cumprod(1.0 - dlib.get_beta_schedule("linear", beta_end=0.2, num_timesteps=T))
  kept = np.round(np.linspace(0, T - 1, num_steps)).astype(int)
  x = np.asarray(x, np.float64)
  for j in range(num_steps - 1, -1, -1):
    a, a_prev = alphas_cumprod[kept[j]], (alphas_cumprod[kept[j - 1]] if j > 0 else 1.0)
    eps = analytic_eps(x, kept[j], xp=np)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip:
      x0 = np.clip(x0, -1, 1)
      eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  return x


@pytest.mark.parametrize("clip", [True, False])
def test_eta_zero_is_deterministic_and_equals_numpy_float64(clip):
  d = make_diffusion()
  x1 = 1.5 * x_T()
  run = lambda key, eta: sample(jax.random.PRNGKey(key), x1, d=d, num_steps=10, method="ddim", eta=eta, clip=clip)
  a, b = run(0, 0.0), run(1, 0.0)
  np.testing.assert_array_equal(a, b)
  assert np.abs(run(0, 0.5) - run(1, 0.5)).max() > 1e-2  # with η > 0 the noise matters (can fail)
  np.testing.assert_allclose(a, numpy_ddim(x1, 10, clip), rtol=1e-5, atol=1e-5)


def test_eta_one_step_is_the_ancestral_posterior_step():
  # σ² = η² (1 − ᾱ_prev)/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_prev) is β̃_t, and the mean √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ is
  # the posterior mean μ̃(x̂0, x_t): so one η = 1 step has the distribution of the 'fixedsmall' ancestral step.
  for num_steps in (T, 10):
    spaced, kept = respacing.respaced(make_diffusion("fixedsmall"), num_steps)
    i = jnp.arange(1, num_steps, dtype=jnp.int32)  # every step but the last (noise-free) one, one per example
    x = 1.5 * jax.random.normal(jax.random.PRNGKey(1), (num_steps - 1,) + SHAPE[1:])
    out = analytic_eps(x, jnp.asarray(kept)[i])
    for clip in (True, False):
      mean, _ = sampling.ddim_step(spaced, out, x, i, jnp.zeros_like(x), eta=1.0, clip_denoised=clip)
      noisy, x0 = sampling.ddim_step(spaced, out, x, i, jnp.ones_like(x), eta=1.0, clip_denoised=clip)
      p = spaced.p_mean_variance(out, x, i, clip)
      np.testing.assert_allclose(mean, p["mean"], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(x0, p["pred_xstart"], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(noisy - mean, np.sqrt(p["variance"]), rtol=1e-4, atol=1e-6)  # σ (noise z = 1)
      np.testing.assert_allclose(p["variance"][:, 0, 0, 0], spaced.posterior_variance[1:], rtol=1e-6)
  # The whole respaced chain, same keys: DDIM η = 1 gives the fixedsmall ancestral samples, not the fixedlarge ones.
  rng = jax.random.PRNGKey(3)
  ddim = sample(rng, d=make_diffusion("fixedsmall"), num_steps=10, method="ddim")
  np.testing.assert_allclose(ddim, sample(rng, d=make_diffusion("fixedsmall"), num_steps=10), rtol=1e-4, atol=1e-4)
  assert np.abs(ddim - sample(rng, d=make_diffusion("fixedlarge"), num_steps=10)).max() > 1e-2


@pytest.mark.parametrize("clip, eta", [(False, 0.0), (True, 0.0), (True, 0.7)])
def test_ddim_step_matches_diffusers(clip, eta):
  # diffusers steps t → t − T // n. Our 8 linspace steps of T = 50 are 0, 7, …, 49, so below 49 each of our steps is
  # one of theirs with n = 7 ('leading' spacing: 42, 35, …, 0, then ᾱ_prev = 1).
  d = make_diffusion()
  spaced, kept = respacing.respaced(d, 8)
  sched = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.2, beta_schedule="linear",
                        clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
  sched.set_timesteps(7)
  assert list(sched.timesteps.numpy()) == list(kept[-2::-1])
  rng = np.random.default_rng(0)
  for t in sched.timesteps.numpy():
    i = int(np.searchsorted(kept, t))
    x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32) * 1.5
    eps, z = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=x.shape).astype(np.float32)
    ours, _ = sampling.ddim_step(spaced, jnp.asarray(eps), jnp.asarray(x), jnp.full((2,), i, jnp.int32),
                                 jnp.asarray(z), eta=eta, clip_denoised=clip)
    theirs = sched.step(torch.from_numpy(eps), int(t), torch.from_numpy(x), eta=eta, use_clipped_model_output=True,
                        variance_noise=torch.from_numpy(z) if eta else None).prev_sample.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-5 * np.abs(theirs).max(), t
  # With their 'linspace' spacing diffusers picks our timesteps (its step then assumes a constant stride, though).
  lin = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.2, timestep_spacing="linspace")
  lin.set_timesteps(10)
  np.testing.assert_array_equal(lin.timesteps.numpy()[::-1], respacing.spaced_timesteps(T, 10))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_chain_spacings_and_the_ddim_trajectory_match_diffusers(spacing):
  # The paper's T = 1000 betas; diffusers' DDIMScheduler configured alike (ᾱ_prev = 1 after the last step, no
  # offset; with clipping, ε recomputed from the clipped x̂_0, as the paper's chain does). Both strides are T // n here,
  # so diffusers' step to t − T // n is our respaced chain's next kept step.
  total = 1000
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=total))

  def eps(x, t, xp=jnp):
    return 0.8 * xp.tanh(x) + 0.3 * (t[:, None, None, None] if xp is jnp else t) / total * xp.sin(3.0 * x)

  x_init = np.asarray(x_T(2))
  for n in (5, 10, 20):
    kept = respacing.chain_timesteps(total, n, spacing)
    for cls in (DDIMScheduler, DDPMScheduler):
      timesteps_of = cls(num_train_timesteps=total, timestep_spacing=spacing)
      timesteps_of.set_timesteps(n)
      np.testing.assert_array_equal(kept[::-1], timesteps_of.timesteps.numpy(), err_msg=f"{cls.__name__} n={n}")
    for clip in (False, True):
      _, ours = sampling.sample_loop(eps, d, jax.random.PRNGKey(0), x_init.shape, x_init=jnp.asarray(x_init),
                                     num_steps=n, method="ddim", eta=0.0, spacing=spacing, clip_denoised=clip,
                                     record_every=1)
      sched = DDIMScheduler(num_train_timesteps=total, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                            clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
      sched.set_timesteps(n)
      x = torch.from_numpy(np.array(x_init))  # a writable copy: x_init comes from a JAX array
      for i, t in enumerate(sched.timesteps.numpy()):
        out = eps(x.numpy(), float(t), xp=np).astype(np.float32)
        x = sched.step(torch.from_numpy(out), int(t), x, eta=0.0, use_clipped_model_output=True).prev_sample
        got = np.asarray(ours["x_t"][i])
        assert np.linalg.norm(got - x.numpy()) <= 1e-5 * np.linalg.norm(x.numpy()), (n, clip, i, t)
  with pytest.raises(ValueError, match="is for the solvers"):
    sampling.sample_loop(eps, d, jax.random.PRNGKey(0), x_init.shape, num_steps=5, method="ddim", spacing="logsnr")


def as_xstart(x, t):
  return make_diffusion().predict_start_from_noise(x, t, analytic_eps(x, t))


def as_xprev(x, t):
  """The one-step posterior mean of the original chain that the x̂0 of analytic_eps implies."""
  return make_diffusion().q_posterior_mean_variance(as_xstart(x, t), x, t)[0]


def test_xstart_and_xprev_networks_sample_like_the_eps_network():
  rng = jax.random.PRNGKey(4)
  for method in ("ancestral", "ddim"):
    kw = dict(num_steps=10, method=method, eta=0.5, clip=False)
    ref = sample(rng, d=make_diffusion("fixedsmall", "eps"), **kw)
    np.testing.assert_allclose(sample(rng, model_fn=as_xstart, d=make_diffusion("fixedsmall", "xstart"), **kw), ref,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sample(rng, model_fn=as_xprev, d=make_diffusion("fixedsmall", "xprev"), **kw), ref,
                               rtol=1e-4, atol=1e-4)
  # Read naively as the respaced chain's posterior mean, the xprev output would give something else (can fail).
  spaced, kept = respacing.respaced(make_diffusion("fixedsmall", "xprev"), 10)
  naive = sampling._chain(as_xprev, spaced, spaced, kept, rng, SHAPE, num_run=10,  # pylint: disable=protected-access
                          method="ddim", eta=0.5, clip_denoised=False)
  assert np.abs(naive - ref).max() > 1e-2


def test_learned_range_interpolates_within_the_respaced_chain():
  # v = +1 gives σ² = β' and v = −1 gives σ² = β̃' of the respaced chain: the fixedlarge / fixedsmall samples.
  d = make_diffusion("learned_range")
  for v, fixed in ((1.0, "fixedlarge"), (-1.0, "fixedsmall")):
    model_fn = lambda x, t, v=v: jnp.concatenate([analytic_eps(x, t), jnp.full_like(x, v)], axis=-1)
    got = sample(jax.random.PRNGKey(2), model_fn=model_fn, d=d, num_steps=10)
    want = sample(jax.random.PRNGKey(2), d=make_diffusion(fixed), num_steps=10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # DDIM ignores a learned variance; respaced ancestral sampling cannot use a raw 'learned' one.
  learned = make_diffusion("learned")
  model_fn = lambda x, t: jnp.concatenate([analytic_eps(x, t), jnp.zeros_like(x)], axis=-1)
  got = sample(jax.random.PRNGKey(2), model_fn=model_fn, d=learned, num_steps=10, method="ddim", eta=0.0)
  want = sample(jax.random.PRNGKey(2), d=make_diffusion(), num_steps=10, method="ddim", eta=0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="'learned' predicts the variance of one step of the full chain"):
    sampling.sample_loop(model_fn, learned, jax.random.PRNGKey(2), SHAPE, num_steps=10)


class TinyNet(nn.Module):
  """A cheap stand-in for the U-Net with its call signature (compiles in a fraction of the time)."""

  @nn.compact
  def __call__(self, x, t, train=False):
    del train
    return nn.Conv(x.shape[-1], (3, 3))(x) * (1.0 + t[:, None, None, None] / T)


def test_sharded_respaced_sampling_does_not_depend_on_the_split():
  assert jax.local_device_count() == 8, "tests run with 8 virtual CPU devices (tests/conftest.py)"
  d = make_diffusion()
  model = TinyNet()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
  rng = jax.random.PRNGKey(3)
  kw = dict(num_steps=10, method="ddim", eta=0.5)
  one = jax.jit(lambda p: sampling.sample_loop(sampling.unet_model_fn(model, p), d, rng, (16, 8, 8, 1), **kw))(params)
  replicated = jax.tree.map(lambda p: jnp.broadcast_to(p, (8,) + p.shape), params)
  first = sampling.sample_sharded(model, replicated, d, rng, 8, (8, 8, 1), **kw)
  second = sampling.sample_sharded(model, replicated, d, rng, 8, (8, 8, 1), first_index=8, **kw)
  np.testing.assert_allclose(np.concatenate([first, second]), one, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_one_line_errors():
  d = make_diffusion()
  run = lambda **kw: sampling.sample_loop(analytic_eps, d, jax.random.PRNGKey(0), SHAPE, **kw)
  cases = [
      (dict(num_steps=0), r"num_steps must be in \[1, 50\]"),
      (dict(num_steps=-3), r"num_steps must be in \[1, 50\]"),
      (dict(num_steps=T + 1), r"num_steps must be in \[1, 50\]"),
      (dict(num_steps=2.5), "num_steps must be an int"),
      (dict(method="plms"), "Unknown sampling method 'plms'"),
      (dict(method="ddim", eta=-0.1), "eta must be a number >= 0"),
      (dict(method="ddim", eta=float("nan")), "eta must be a number >= 0"),
      (dict(num_steps=10, start_t=8, x_init=x_T()), "start_t 8 is not one of the 10 respaced timesteps"),
      (dict(num_steps=10, start_t=T), r"start_t must be in \[0, 49\]"),
  ]
  for kw, message in cases:
    with pytest.raises(ValueError, match=message) as err:
      run(**kw)
    assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="num_steps must be in"):
    sampling.sample_sharded(None, None, d, jax.random.PRNGKey(0), 8, (4, 4, 1), num_steps=0)
  with pytest.raises(ValueError, match="Unknown sampling method"):
    sampling.sample_sharded(None, None, d, jax.random.PRNGKey(0), 8, (4, 4, 1), method="DDIM")
  with pytest.raises(ValueError, match="needs a concrete diffusion"):
    jax.jit(lambda dd: respacing.respaced(dd, 10)[0].betas)(d)
  # A kept start_t is fine: from t = 0 DDIM returns x̂0 in one step.
  x1 = x_T()
  out = run(num_steps=10, start_t=0, x_init=x1, method="ddim", eta=0.0)
  np.testing.assert_allclose(out, jnp.clip(d.predict_start_from_noise(x1, jnp.zeros(4, jnp.int32),
                                                                      analytic_eps(x1, jnp.zeros(4, jnp.int32))),
                                           -1, 1), rtol=1e-6)


def test_sample_to_dir_uses_the_configured_sampler(tmp_path):
  """--mode=sample with sampling.num_steps/method/eta/clip_denoised: the chain asked for, in its own directory."""
  config = tiny_config(num_train_steps=2)
  state = train.train_and_evaluate(config, str(tmp_path))
  config.sampling.num_samples = 8
  config.sampling.num_steps, config.sampling.method, config.sampling.eta = 5, "ddim", 0.0
  config.sampling.clip_denoised = False
  out = sample_mode.run(config, str(tmp_path))
  assert out.endswith("samples/step_00000002_ddim5_eta0.0")
  model = train_step.create_model(config)
  d = dlib.GaussianDiffusion.from_config(config.diffusion)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  want = sampling.sample_loop(sampling.unet_model_fn(model, state.ema_params), d, rng, (8, 8, 8, 1), num_steps=5,
                              method="ddim", eta=0.0, clip_denoised=False)
  got = samples.load_samples(out)
  assert np.abs(got.astype(int) - images.to_uint8(want).astype(int)).max() <= 1  # rounding at .5 may differ
  # Analytic-DPM: the driver estimates E‖ε̂‖² on analytic_num_examples training examples before sampling.
  config.sampling.method, config.sampling.analytic_num_examples = "analytic_dpm", 12
  out = sample_mode.run(config, str(tmp_path))
  assert out.endswith("samples/step_00000002_analytic_dpm5")
  fitted = analytic_dpm.fit(Sampler(method="analytic_dpm", num_steps=5), sampling.unet_model_fn(model, state.ema_params),
                            d, input_pipeline.make_source(config.data), num_examples=12, batch_size=8, seed=config.seed)
  want = sampling.sample_loop(sampling.unet_model_fn(model, state.ema_params), d, rng, (8, 8, 8, 1), num_steps=5,
                              method="analytic_dpm", gamma=fitted.gamma, clip_denoised=False)
  assert np.abs(samples.load_samples(out).astype(int) - images.to_uint8(want).astype(int)).max() <= 1
  config.sampling.num_steps, config.sampling.method = 0, "ancestral"
  assert sample_mode.run(config, str(tmp_path)).endswith("samples/step_00000002")
