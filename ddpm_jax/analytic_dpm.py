"""Analytic-DPM (Bao et al. 2022): the ancestral chain's optimal reverse variances, from E‖ε̂‖² on training data.

A respaced ancestral step from t to s < t draws x_s from N(μ̃(x_t, x̂_0), σ²). The paper's σ² (β̃ or β) is right
for 1000 small steps and too large or too small for 10–100 long ones. Among Gaussian steps with that mean, the one
closest in KL to the true reverse process has

    σ*² = β̃ + c² · E[Var(x_0 | x_t)]/d,   E[Var(x_0 | x_t)]/d = (1 − ᾱ_t)/ᾱ_t · (1 − Γ_t),

with β̃ the posterior variance of q(x_s | x_t, x_0), c its mean's coefficient of x_0, and Γ_t = E‖ε̂(x_t, t)‖²/d
over x_t ~ q(x_t): the only data-dependent term, estimated once per timestep by Monte Carlo over training examples.
(The identity follows from E[ε | x_t] = ε̂ and x_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t.) The estimate of E[Var(x_0 | x_t)]/d
is clipped to [0, ((b − a)/2)²] for data in [a, b] = [−1, 1]: the paper's two bounds on σ*².

`fit` estimates Γ at a sampler's timesteps and returns the sampler carrying it; `optimal_variances` turns Γ into the
chain's variances (in float64 NumPy, from the concrete diffusion: the chain is built outside or closed over by a
compiled program) and `with_variances` puts them in the respaced diffusion, whose ancestral step
(diffusion.p_sample) then runs unchanged.
"""
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import respacing

METHOD = "analytic_dpm"
DATA_HALF_RANGE = 1.0  # (b − a)/2 for images scaled to [−1, 1]


def _eps_from_output(diffusion, output, x_t, t):
  """The network's ε̂ whatever it predicts (ε, x_0, v, or the x_{t−1} mean of an 'xprev' model); a learned variance
  is ignored."""
  out, _ = diffusion.split_model_output(output)
  if diffusion.model_mean_type == "eps":
    return out
  x0 = diffusion.predict_start(x_t, t, out)
  shape = (-1,) + (1,) * (x_t.ndim - 1)
  return ((x_t - diffusion.sqrt_alphas_cumprod[t].reshape(shape) * x0)
          / diffusion.sqrt_one_minus_alphas_cumprod[t].reshape(shape))


@functools.partial(jax.jit, static_argnums=0)
def _sum_sq_norms(apply_fn, args, diffusion, timesteps, x_start, rng):
  """Σ over the batch of ‖ε̂(x_t, t)‖²/d at each t of timesteps (one scan), float32 [n]; the network is
  apply_fn(*args, x_t, t)."""
  def per_t(_, t_scalar):
    noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape)
    t = jnp.full((x_start.shape[0],), t_scalar, jnp.int32)
    x_t = diffusion.q_sample(x_start, t, noise)
    eps = _eps_from_output(diffusion, apply_fn(*args, x_t, t), x_t, t)
    return None, jnp.sum(jnp.mean(jnp.square(eps), axis=tuple(range(1, eps.ndim))))
  return jax.lax.scan(per_t, None, timesteps)[1]


def noise_norms(model_fn, diffusion, timesteps, x_start_batches, rng):
  """Γ_t = E‖ε̂(x_t, t)‖²/d at each t of timesteps (original indices of `diffusion`), float64 [n].

  model_fn(x_t, t) as in sampling.sample_loop; a jax.tree_util.Partial (sampling.unet_model_fn) has its arguments,
  the params, passed to one compiled program for every batch. x_start_batches: an iterable of float [B, H, W, C] in
  [−1, 1]; batch k noises its examples with keys fold_in(fold_in(rng, k), t).
  """
  is_partial = isinstance(model_fn, jax.tree_util.Partial)
  apply_fn, args = (model_fn.func, tuple(model_fn.args)) if is_partial else (model_fn, ())
  timesteps = jnp.asarray(timesteps, jnp.int32)
  total, count = np.zeros(timesteps.shape[0]), 0
  for k, batch in enumerate(x_start_batches):
    batch = jnp.asarray(batch, jnp.float32)
    total += np.asarray(_sum_sq_norms(apply_fn, args, diffusion, timesteps, batch, jax.random.fold_in(rng, k)))
    count += batch.shape[0]
  if not count:
    raise ValueError("Analytic-DPM needs training examples to estimate E‖ε̂‖²; the data source gave none.")
  return total / count


def optimal_variances(diffusion, timesteps, gamma, data_half_range=DATA_HALF_RANGE):
  """σ*² of each step of the chain over `timesteps` (increasing original t of a concrete diffusion), float64 [n],
  from Γ at those timesteps (gamma [n]). Step i goes from timesteps[i] to timesteps[i − 1] (step 0: to the data).

  data_half_range: (b − a)/2 of the data, which bounds Var(x_0 | x_t); None leaves it unbounded (for tests with
  unbounded data). Step 0 ends the chain without noise (diffusion.p_sample), so its value only matters for bits/dim.
  """
  gamma, timesteps = np.asarray(gamma, np.float64), np.asarray(timesteps)
  if gamma.shape != timesteps.shape:
    raise ValueError(f"Analytic-DPM: {gamma.shape[0]} estimates of E‖ε̂‖² for a chain of {timesteps.shape[0]} steps; "
                     "estimate them at the chain's own timesteps (analytic_dpm.fit).")
  alphas_cumprod = respacing.float64_alphas_cumprod(diffusion)[timesteps]
  prev = np.append(1.0, alphas_cumprod[:-1])
  one_minus, one_minus_prev = 1.0 - alphas_cumprod, 1.0 - prev
  betas = 1.0 - alphas_cumprod / prev  # of the respaced pair
  posterior_variance = betas * one_minus_prev / one_minus  # β̃
  coef_x0 = betas * np.sqrt(prev) / one_minus  # c
  var_x0 = one_minus / alphas_cumprod * (1.0 - gamma)
  var_x0 = np.maximum(var_x0, 0.0) if data_half_range is None else np.clip(var_x0, 0.0, data_half_range**2)
  return posterior_variance + coef_x0**2 * var_x0


def with_variances(spaced, variances):
  """A copy of the respaced diffusion whose ancestral step (p_sample) draws with `variances` (σ² per step)."""
  variances = np.asarray(variances, np.float64)
  # log σ² at the noiseless last step is never used for sampling; keep it finite as the fixed variances do.
  log_variance = np.log(np.maximum(variances, np.finfo(np.float32).tiny))
  return dataclasses.replace(spaced, model_var_type="fixedsmall",
                             posterior_variance=jnp.asarray(variances, jnp.float32),
                             posterior_log_variance_clipped=jnp.asarray(log_variance, jnp.float32))


def check(diffusion):
  """One-line error for a diffusion whose chain Analytic-DPM cannot reweight."""
  if diffusion.model_var_type in ("learned", "learned_range"):
    raise ValueError(f"sampling.method {METHOD!r} replaces a fixed reverse variance, but this model learns its own "
                     f"(model_var_type={diffusion.model_var_type!r}); use method 'ancestral' or 'ddim'.")


def example_batches(source, num_examples, batch_size, seed):
  """float32 batches [≤ batch_size, H, W, C] in [−1, 1] of num_examples examples of a random-access uint8 source,
  drawn without replacement (all of them if it has fewer)."""
  if num_examples <= 0:
    raise ValueError(f"sampling.analytic_num_examples must be > 0, got {num_examples}.")
  chosen = np.sort(np.random.default_rng(seed).permutation(len(source))[:num_examples])
  for start in range(0, len(chosen), batch_size):
    yield np.stack([source[int(i)] for i in chosen[start:start + batch_size]]).astype(np.float32) / 127.5 - 1.0


def fit(sampler, model_fn, diffusion, source, *, num_examples, batch_size, seed):
  """The sampler (method 'analytic_dpm') carrying Γ at its chain's timesteps, estimated on num_examples examples of
  `source` (random access to uint8 images: input_pipeline.make_source)."""
  check(diffusion)
  timesteps = sampler.timesteps(diffusion.num_timesteps)
  logging.info("Analytic-DPM: estimating E‖ε̂‖² at %d timesteps on %d training examples", len(timesteps),
               min(num_examples, len(source)))
  gamma = noise_norms(model_fn, diffusion, timesteps, example_batches(source, num_examples, batch_size, seed),
                      jax.random.PRNGKey(seed))
  return dataclasses.replace(sampler, gamma=tuple(float(g) for g in gamma))
