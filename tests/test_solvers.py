"""Fast solvers (solvers.py): step-by-step parity with diffusers, closed-form exactness, convergence order, spacings."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers import UniPCMultistepScheduler

from ddpm_jax import diffusion as dlib
from ddpm_jax import solvers
from conftest import perturbed

T = 1000
SHAPE = (2, 4, 4, 1)
DIM = 16  # pixels per example
DIFFUSERS = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
SCHEDULERS = {"dpm_solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++")),
              "sde_dpm_solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
              "unipc": (UniPCMultistepScheduler, {})}
ALL_ORDERS = [("dpm_solver++", 1), ("dpm_solver++", 2), ("dpm_solver++", 3), ("sde_dpm_solver++", 2), ("unipc", 1),
              ("unipc", 2), ("unipc", 3)]

_rs = np.random.RandomState(0)
W = (_rs.randn(DIM, DIM) / 4).astype(np.float32)
U = _rs.randn(1, DIM).astype(np.float32)
X_T = _rs.randn(*SHAPE).astype(np.float32)


@functools.lru_cache(maxsize=None)
def paper_diffusion():
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T))


def eps_jax(x, t):
  """A fixed stand-in network, nonlinear in x and t: ε̂ = tanh(x W + sin(t/100) u) per example."""
  phase = jnp.sin(0.01 * t.astype(jnp.float32))[:, None] * jnp.asarray(U)
  return jnp.tanh(x.reshape(x.shape[0], DIM) @ jnp.asarray(W) + phase).reshape(x.shape)


def eps_torch(x, t):
  """eps_jax in torch (t a Python int, as diffusers' pipelines pass it)."""
  phase = torch.sin(torch.full((x.shape[0], 1), 0.01 * t)) * torch.from_numpy(U)
  return torch.tanh(x.reshape(x.shape[0], DIM) @ torch.from_numpy(W) + phase).reshape(x.shape)


def diffusers_trajectory(method, order, num_steps, spacing, noises):
  """diffusers' prev_sample after every step from X_T, and its timesteps."""
  cls, kwargs = SCHEDULERS[method]
  spacing_kwargs = dict(use_karras_sigmas=True) if spacing == "karras" else dict(timestep_spacing=spacing)
  scheduler = cls(**DIFFUSERS, solver_order=order, **spacing_kwargs, **kwargs)
  scheduler.set_timesteps(num_steps)
  x, xs = torch.from_numpy(X_T), []
  for i, t in enumerate(scheduler.timesteps):
    extra = {} if noises is None else dict(variance_noise=torch.from_numpy(noises[i]))
    x = scheduler.step(eps_torch(x, int(t)), t, x, **extra).prev_sample
    xs.append(x.numpy())
  return np.stack(xs), scheduler.timesteps.numpy()


PARITY_CASES = ([("dpm_solver++", 2, n, s) for n in (5, 10, 20) for s in ("linspace", "leading", "trailing")]
                + [(m, o, n, "linspace") for m, o in [("dpm_solver++", 3), ("sde_dpm_solver++", 2), ("unipc", 2),
                                                      ("unipc", 3)] for n in (5, 10, 20)]
                + [("dpm_solver++", 1, 10, "trailing"), ("unipc", 1, 10, "leading"), ("unipc", 2, 10, "trailing")]
                + [(m, o, n, "karras") for m, o in [("dpm_solver++", 2), ("sde_dpm_solver++", 2), ("unipc", 2)]
                   for n in (5, 10, 20)] + [("dpm_solver++", 3, 10, "karras")])


@pytest.mark.parametrize("method,order,num_steps,spacing", PARITY_CASES)
def test_trajectory_matches_diffusers(method, order, num_steps, spacing):
  # Our tables are float64-derived; diffusers' ᾱ is a float32 cumprod. The difference stays ~1e-7 relative on
  # these trajectories (measured 2e-7–5e-7), so no float32 copy of diffusers' tables is needed for 1e-5.
  noises = (np.random.RandomState(num_steps).randn(num_steps, *SHAPE).astype(np.float32)
            if method == "sde_dpm_solver++" else None)
  theirs, their_steps = diffusers_trajectory(method, order, num_steps, spacing, noises)
  ac = np.asarray(paper_diffusion().alphas_cumprod, np.float64)
  steps = solvers.solver_timesteps(T, num_steps, spacing, alphas_cumprod=ac)
  np.testing.assert_array_equal(steps, their_steps)
  # 'karras' steps between its own noise levels; the network sees their rounded timesteps.
  sigmas = solvers.karras_sigmas(ac, num_steps) if spacing == "karras" else None
  noise_fn = None if noises is None else (lambda i: jnp.asarray(noises)[i])
  x_0, ours = solvers.solve(eps_jax, paper_diffusion(), jnp.asarray(X_T), steps, method=method, order=order,
                            sigmas=sigmas, noise_fn=noise_fn, return_trajectory=True)
  ours = np.asarray(ours)
  assert ours.shape == (num_steps,) + SHAPE
  np.testing.assert_array_equal(np.asarray(x_0), ours[-1])
  errors = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(ours, theirs)]
  assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_spacings_match_diffusers(spacing):
  for n in (1, 5, 10, 20, 50, 333):
    ours = solvers.solver_timesteps(T, n, spacing)
    assert ours.dtype == np.int32
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
      scheduler = cls(**DIFFUSERS, timestep_spacing=spacing)
      scheduler.set_timesteps(n)
      np.testing.assert_array_equal(ours, scheduler.timesteps.numpy(), err_msg=f"{cls.__name__} n={n}")


def test_karras_spacing_matches_diffusers():
  ac = np.asarray(paper_diffusion().alphas_cumprod, np.float64)
  sigma = np.sqrt((1 - ac) / ac)
  for n in (1, 2, 5, 10, 20, 50):
    levels = solvers.karras_sigmas(ac, n)
    # EDM's eq. 5 with ρ = 7: the ends are the table's, and σ^(1/7) falls by equal steps.
    np.testing.assert_allclose(levels[0], sigma[-1])
    if n > 1:
      np.testing.assert_allclose(levels[-1], sigma[0])
      np.testing.assert_allclose(np.diff(levels ** (1 / 7)), np.diff(levels ** (1 / 7))[0], rtol=1e-9)
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
      scheduler = cls(**DIFFUSERS, use_karras_sigmas=True)
      scheduler.set_timesteps(n)
      np.testing.assert_array_equal(solvers.solver_timesteps(T, n, "karras", alphas_cumprod=ac),
                                    scheduler.timesteps.numpy(), err_msg=f"{cls.__name__} n={n}")
      np.testing.assert_allclose(levels, scheduler.sigmas.numpy()[:-1], rtol=1e-6)
  with pytest.raises(ValueError, match="distinct"):  # rounded, 100 Karras levels repeat timesteps near t = 0
    solvers.solver_timesteps(T, 100, "karras", alphas_cumprod=ac)


@pytest.mark.parametrize("spacing", ["quadratic", "logsnr"])
def test_own_spacings(spacing):
  d = paper_diffusion()
  ac = np.asarray(d.alphas_cumprod, np.float64)
  lam = 0.5 * np.log(ac / np.asarray(d.one_minus_alphas_cumprod, np.float64))
  for n in (1, 2, 5, 10, 20, 50, 200):
    steps = solvers.solver_timesteps(T, n, spacing, alphas_cumprod=ac)
    assert steps.shape == (n,) and steps.dtype == np.int32
    assert np.all(np.diff(steps) < 0) and steps[0] <= T - 1 and steps[-1] >= 0
    assert steps[0] == T - 1
    if spacing == "logsnr" and 2 <= n <= 20:  # beyond, λ(0) − λ(1) > the grid step: steps collide near t = 0
      assert steps[-1] == 0
      # Uniform in λ: each step is the timestep whose λ is nearest its point of the even grid.
      grid = np.linspace(lam[T - 1], lam[0], n)
      for t, g in zip(steps, grid):
        neighbours = [u for u in (t - 1, t + 1) if 0 <= u < T]
        assert all(abs(lam[t] - g) <= abs(lam[u] - g) for u in neighbours), (t, g)
  np.testing.assert_array_equal(solvers.solver_timesteps(T, 5, "quadratic"), [999, 639, 360, 160, 40])
  np.testing.assert_array_equal(solvers.solver_timesteps(T, T, "quadratic"), np.arange(T - 1, -1, -1))


def test_spacing_errors():
  with pytest.raises(ValueError, match="alphas_cumprod"):
    solvers.solver_timesteps(T, 10, "logsnr")
  with pytest.raises(ValueError, match="Unknown timestep spacing"):
    solvers.solver_timesteps(T, 10, "cosine")
  with pytest.raises(ValueError, match="alphas_cumprod"):
    solvers.solver_timesteps(T, 10, "karras")
  with pytest.raises(ValueError, match="num_steps"):
    solvers.solver_timesteps(T, 0, "linspace")
  with pytest.raises(ValueError, match="distinct"):  # diffusers' 'linspace' repeats timesteps for n close to T
    solvers.solver_timesteps(T, T, "linspace")


def _alpha_sigma(d, t):
  return (np.sqrt(np.asarray(d.alphas_cumprod, np.float64)[t]),
          np.sqrt(np.asarray(d.one_minus_alphas_cumprod, np.float64)[t]))


@pytest.mark.parametrize("method,order", ALL_ORDERS)
def test_point_mass_is_exact(method, order):
  # Data = one point x*: ε̂(x_t, t) = (x_t − √ᾱ_t x*)/√(1 − ᾱ_t) is the exact model, so x̂_0 = x* at every step and
  # the ODE's solution keeps ε fixed: x_t = α_t x* + σ_t ε_T. An ODE solver must hit it at every step; the SDE keeps
  # the marginal: with ε_T and the step noises orthonormal, ‖x_t − α_t x*‖ = σ_t exactly.
  d = paper_diffusion()
  steps = solvers.solver_timesteps(T, 5, "linspace")
  basis = np.linalg.qr(np.random.RandomState(1).randn(DIM, 6))[0].T.reshape(6, 1, 4, 4, 1)  # orthonormal
  x_star = np.random.RandomState(2).uniform(-1, 1, (1, 4, 4, 1))
  eps_T = basis[0]
  a_T, s_T = _alpha_sigma(d, steps[0])
  x_T = jnp.asarray(a_T * x_star + s_T * eps_T, jnp.float32)
  sqrt_ac, sqrt_om = jnp.sqrt(d.alphas_cumprod), jnp.sqrt(d.one_minus_alphas_cumprod)

  def exact_eps(x, t):
    return (x - sqrt_ac[t][:, None, None, None] * x_star.astype(np.float32)) / sqrt_om[t][:, None, None, None]

  noises = jnp.asarray(basis[1:], jnp.float32)
  x_0, xs = solvers.solve(exact_eps, d, x_T, steps, method=method, order=order, noise_fn=lambda i: noises[i],
                          return_trajectory=True)
  np.testing.assert_allclose(np.asarray(x_0), x_star, atol=1e-4)
  for i, t in enumerate(steps[1:]):
    a_t, s_t = _alpha_sigma(d, t)
    if method == "sde_dpm_solver++":
      np.testing.assert_allclose(np.linalg.norm(np.asarray(xs[i], np.float64) - a_t * x_star), s_t, rtol=1e-4)
    else:
      np.testing.assert_allclose(np.asarray(xs[i]), a_t * x_star + s_t * eps_T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,order,min_ratio", [("dpm_solver++", 1, 1.8), ("dpm_solver++", 2, 3.3),
                                                    ("dpm_solver++", 3, 4.5), ("unipc", 1, 3.3), ("unipc", 2, 6.0)])
def test_convergence_order_on_gaussian_data(method, order, min_ratio):
  # Data ~ N(μ, s²) per pixel: the exact ε-model and the ODE's solution are known, (x_t − α_t μ)/√(α_t²s² + σ_t²)
  # being constant. Doubling the steps (log-SNR spacing) must cut the error at the last timestep by ~2^p: DPM-Solver
  # ++ of order p is p-th order (3M is held near 2nd by its first-order warm-up step), UniPC-p is (p+1)-th.
  d = paper_diffusion()
  mu, s = 0.3, 0.5
  ac = np.asarray(d.alphas_cumprod, np.float64)
  sqrt_ac, sqrt_om = jnp.sqrt(d.alphas_cumprod), jnp.sqrt(d.one_minus_alphas_cumprod)

  def gaussian_eps(x, t):
    a, sg = sqrt_ac[t][:, None, None, None], sqrt_om[t][:, None, None, None]
    return sg * (x - a * mu) / (a * a * s * s + sg * sg)

  def spread(t):
    a, sg = _alpha_sigma(d, t)
    return np.sqrt(a * a * s * s + sg * sg)

  errors = []
  for n in (16, 32):
    steps = solvers.solver_timesteps(T, n, "logsnr", alphas_cumprod=ac)
    _, xs = solvers.solve(gaussian_eps, d, jnp.asarray(X_T), steps, method=method, order=order,
                          return_trajectory=True)
    a_T, _ = _alpha_sigma(d, T - 1)
    a_last, _ = _alpha_sigma(d, steps[-1])
    exact = a_last * mu + spread(steps[-1]) / spread(T - 1) * (X_T - a_T * mu)
    errors.append(np.linalg.norm(np.asarray(xs[-2]) - exact) / np.linalg.norm(exact))
  assert errors[0] / errors[1] >= min_ratio, errors


def test_clip_and_report():
  # x̂_0 = 1.5 everywhere: clipped to 1, the last step (to σ = 0) returns exactly 1; the report hook sees every step.
  d = paper_diffusion()
  steps = solvers.solver_timesteps(T, 5, "trailing")
  sqrt_ac, sqrt_om = jnp.sqrt(d.alphas_cumprod), jnp.sqrt(d.one_minus_alphas_cumprod)
  x_eps = lambda x, t: (x - sqrt_ac[t][:, None, None, None] * 1.5) / sqrt_om[t][:, None, None, None]
  seen = []
  report = lambda done: jax.debug.callback(lambda v: seen.append(int(v)), done)
  for method in ("dpm_solver++", "unipc"):
    x_0 = solvers.solve(x_eps, d, jnp.asarray(X_T), steps, method=method, order=2, clip_denoised=True,
                        report=report)
    np.testing.assert_allclose(np.asarray(x_0), 1.0, rtol=1e-6)
  jax.effects_barrier()
  assert sorted(seen) == sorted([1, 2, 3, 4, 5] * 2)
  unclipped = solvers.solve(x_eps, d, jnp.asarray(X_T), steps, method="dpm_solver++", order=2)
  np.testing.assert_allclose(np.asarray(unclipped), 1.5, rtol=1e-4)


def test_solve_is_one_scan_under_jit():
  # The whole chain is one compiled program: jit it with x_T traced; the result equals the eager one.
  d = paper_diffusion()
  steps = solvers.solver_timesteps(T, 10, "linspace")
  run = lambda x: solvers.solve(eps_jax, d, x, steps, method="unipc", order=2)
  jaxpr = jax.make_jaxpr(run)(jnp.asarray(X_T))
  assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("scan") == 1
  np.testing.assert_allclose(np.asarray(jax.jit(run)(jnp.asarray(X_T))), np.asarray(run(jnp.asarray(X_T))),
                             rtol=1e-6, atol=1e-6)


def test_argument_errors():
  d = paper_diffusion()
  steps = solvers.solver_timesteps(T, 5, "linspace")
  x = jnp.asarray(X_T)
  with pytest.raises(ValueError, match="order 1 to 2"):
    solvers.solve(eps_jax, d, x, steps, method="sde_dpm_solver++", order=3, noise_fn=lambda i: x)
  with pytest.raises(ValueError, match="noise_fn"):
    solvers.solve(eps_jax, d, x, steps, method="sde_dpm_solver++", order=2)
  with pytest.raises(ValueError, match="Unknown solver"):
    solvers.solve(eps_jax, d, x, steps, method="deis", order=2)
  with pytest.raises(ValueError, match="descending"):
    solvers.solve(eps_jax, d, x, steps[::-1], method="unipc", order=2)
  with pytest.raises(ValueError, match="descending"):
    solvers.solve(eps_jax, d, x, np.array([1000, 500]), method="unipc", order=2)


# ---------------------------------------------------------------------------------------------------------------
# The solvers inside the package's sampling: sample_loop, sample_sharded and the Sampler.

def _tiny_unet():
  """A small U-Net whose output depends on x and t (its zero-initialised output convs replaced by random ones)."""
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
  model = unet.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, out_ch=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
  return model, perturbed(params, 0.05)


@pytest.mark.parametrize("method", solvers.METHODS)
def test_sample_sharded_equals_sample_loop_and_the_solver_itself(method):
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  from ddpm_jax.sampler import Sampler  # pylint: disable=g-import-not-at-top
  model, params = _tiny_unet()
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=100))
  sampler = Sampler(method=method, num_steps=6, order=2, clip_denoised=False)
  rng = jax.random.PRNGKey(3)
  model_fn = sampling.unet_model_fn(model, params)
  one = sampling.sample_loop(model_fn, d, rng, (16, 8, 8, 1), **sampler.chain_kwargs())
  replicated = jax.tree.map(lambda p: jnp.broadcast_to(p, (jax.local_device_count(),) + p.shape), params)
  many = sampling.sample_sharded(model, replicated, d, rng, 16, (8, 8, 1), **sampler.chain_kwargs())
  np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5)  # any split over devices: the same samples
  # The same as solvers.solve from the per-example x_T, at the 'logsnr' timesteps ('auto').
  indices = jnp.arange(16)
  x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 100), (8, 8, 1)))(indices)
  timesteps = solvers.solver_timesteps(100, 6, "logsnr", alphas_cumprod=np.asarray(d.alphas_cumprod, np.float64))
  noise = lambda i: jax.vmap(lambda k: jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(rng, k), jnp.asarray(timesteps)[i]), (8, 8, 1)))(indices)
  want = solvers.solve(model_fn, d, x_T, timesteps, method=method, order=2,
                       noise_fn=noise if method == "sde_dpm_solver++" else None)
  np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(one - x_T)) > 0.1  # the network moved the samples: the comparison is not of x_T with itself


def test_the_samplers_karras_plan_steps_between_karras_noise_levels():
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=100))
  ac = np.asarray(d.alphas_cumprod, np.float64)
  got = sampling.solver_plan(d, 6, "dpm_solver++", 2, "karras")
  levels = solvers.karras_sigmas(ac, 6)
  np.testing.assert_array_equal(got["t"], solvers.solver_timesteps(100, 6, "karras", alphas_cumprod=ac))
  np.testing.assert_allclose(got["sigma"] / got["alpha"], levels, rtol=1e-6)  # not the rounded timesteps' levels
  assert np.abs(got["sigma"] / got["alpha"] - np.sqrt((1 - ac) / ac)[got["t"]]).max() > 1e-3


def test_sampler_from_config_tags_and_errors():
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  from ddpm_jax.sampler import Sampler  # pylint: disable=g-import-not-at-top
  c = cifar10.get_config().sampling
  assert Sampler.from_config(c) == Sampler() and Sampler().tag(1000) == ""  # the paper's chain by default
  c.method, c.num_steps, c.order, c.spacing = "dpm_solver++", 20, 3, "trailing"
  s = Sampler.from_config(c)
  assert s.tag(1000) == "_dpm_solver++3_20_trailing"
  assert s.chain_kwargs() == dict(clip_denoised=True, num_steps=20, method="dpm_solver++", eta=0.0, order=3,
                                  spacing="trailing")
  assert Sampler(method="unipc", num_steps=10).tag(1000) == "_unipc2_10_logsnr"
  assert Sampler(method="ddim", num_steps=50).tag(1000) == "_ddim50_eta0.0"
  assert Sampler(method="ddim", num_steps=50, spacing="even").tag(1000) == "_ddim50_eta0.0"  # 'auto' for a chain
  trailing = Sampler(method="ddim", num_steps=50, spacing="trailing")
  assert trailing.tag(1000) == "_ddim50_eta0.0_trailing" and trailing.chain_kwargs()["spacing"] == "trailing"
  assert "spacing" not in Sampler(method="ddim", num_steps=50).chain_kwargs()  # results files of old runs unchanged
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=100))
  model_fn = lambda x, t: jnp.zeros_like(x)
  for kwargs, message in [(dict(method="dpm_solver++"), "needs num_steps >= 1"),
                          (dict(method="dpm_solver++", num_steps=5, order=4), "order must be 1 to 3"),
                          (dict(method="sde_dpm_solver++", num_steps=5, order=3), "order must be 1 to 2"),
                          (dict(method="ddim", num_steps=5, spacing="logsnr"), "runs a respaced chain"),
                          (dict(method="unipc", num_steps=5, spacing="even"), "spacing 'even' is the respaced"),
                          (dict(method="unipc", num_steps=5, spacing="cosine"), "Unknown timestep spacing")]:
    with pytest.raises(ValueError, match=message):
      sampling.sample_loop(model_fn, d, jax.random.PRNGKey(0), (2, 4, 4, 1), **kwargs)
  with pytest.raises(ValueError, match="runs from x_T only"):
    sampling.sample_loop(model_fn, d, jax.random.PRNGKey(0), (2, 4, 4, 1), method="unipc", num_steps=5, start_t=50)
  with pytest.raises(ValueError, match="sampling.method = 'dpm'"):
    Sampler(method="dpm")
