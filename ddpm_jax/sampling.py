"""The reverse chain (the paper's Algorithm 2) as one `lax.scan`, compiled once; also respaced and DDIM sampling.

Randomness is per example: example i of a call draws x_T from fold_in(fold_in(rng, first_index + i), T) and its
step-t noise from fold_in(fold_in(rng, first_index + i), t). So a batch split over devices or hosts (each passing
its `first_index`) gives exactly the samples of one big batch, whatever the device count.

Faster sampling: num_steps < T runs a respaced chain (respacing.py) of num_steps steps, the network still seeing the
original t (and t, not the step's index in the short chain, keys its noise, so the scheme above is unchanged).
method='ddim' takes DDIM steps (Song et al. 2021) with noise scale η: η = 0 is deterministic given x_T, η = 1 is
ancestral sampling with σ² = β̃ (the 'fixedsmall' chain) on the same timesteps.

A chain runs for minutes as one compiled program: progress=fn has it call fn(steps run) on the host every ~1% of
its steps (progress.py), leaving the samples unchanged; without it the program has no callback at all.
"""
import copy
import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import analytic_dpm
from ddpm_jax import devices
from ddpm_jax import progress as progress_lib
from ddpm_jax import respacing
from ddpm_jax import solvers

# One step of a (respaced) Markov chain per network call; 'analytic_dpm' is the ancestral chain with Analytic-DPM's
# variances (analytic_dpm.py).
CHAIN_METHODS = ("ancestral", "ddim", analytic_dpm.METHOD)
METHODS = CHAIN_METHODS + solvers.METHODS  # the fast multistep solvers run in solvers.py
# The few-step samplers that need nothing but the network (not 'analytic_dpm', which is fitted to data first):
# training.fid_method's choices.
FEW_STEP_METHODS = ("ddim",) + solvers.METHODS
# 'auto': 'even' for the chains, 'logsnr' for the solvers. 'leading' and 'trailing' are diffusers' definitions of the
# method's scheduler (DDIMScheduler for the chains, DPMSolverMultistepScheduler for the solvers), which differ.
SPACINGS = tuple(dict.fromkeys(("auto",) + respacing.SPACINGS + solvers.SPACINGS))


def chain_spacing(spacing):
  """The respacing.SPACINGS entry a chain (ancestral, DDIM) runs for config.sampling.spacing ('auto' = 'even')."""
  return "even" if spacing == "auto" else spacing


def per_example_normal(rng, indices, t, shape):
  """[len(indices), *shape] standard normals; row i depends only on (rng, indices[i], t)."""
  draw = lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), t), shape)
  return jax.vmap(draw)(indices)


def _rows(values, x):
  """Per-example values [B] shaped [B, 1, …, 1] to broadcast against x (rank kept equal on purpose)."""
  return values.reshape((values.shape[0],) + (1,) * (x.ndim - 1)).astype(x.dtype)


def ddim_step(diffusion, model_output, x_t, t, noise, *, eta=0.0, clip_denoised=True):
  """One DDIM step x_t → x_{t−1} of `diffusion` (usually a respaced chain; t [B] indexes it); returns (x_{t−1}, x̂_0).

  x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z, σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}).
  With clipping, ε̂ is re-derived from the clipped x̂_0 so that the step stays on the line through x_t and x̂_0 (as
  improved DDPM does). A learned variance is ignored. An 'xprev' output is read as one step of `diffusion` itself.
  """
  out, _ = diffusion.split_model_output(model_output)
  pred_xstart = diffusion.predict_start(x_t, t, out)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  if diffusion.model_mean_type == "eps" and not clip_denoised:
    eps = out
  else:
    eps = ((x_t - _rows(diffusion.sqrt_alphas_cumprod[t], x_t) * pred_xstart)
           / _rows(diffusion.sqrt_one_minus_alphas_cumprod[t], x_t))
  # 1 − ᾱ_{t−1} and 1 − ᾱ_t/ᾱ_{t−1} (= β_t) come from the float64-derived tables: float32 loses digits at small t.
  one_minus_prev = jnp.where(t > 0, diffusion.one_minus_alphas_cumprod[jnp.maximum(t - 1, 0)], 0.0)
  variance = eta**2 * one_minus_prev / diffusion.one_minus_alphas_cumprod[t] * diffusion.betas[t]
  x_prev = (_rows(jnp.sqrt(diffusion.alphas_cumprod_prev[t]), x_t) * pred_xstart
            + _rows(jnp.sqrt(jnp.maximum(one_minus_prev - variance, 0.0)), x_t) * eps
            + _rows(jnp.sqrt(variance), x_t) * noise)
  return x_prev, pred_xstart


def check_sampler(diffusion, num_kept, method, eta, order=2, spacing="auto"):
  """One-line errors for a sampler the chain cannot run (num_kept: its number of network calls)."""
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; choose one of {METHODS}.")
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not eta >= 0:
    raise ValueError(f"eta must be a number >= 0 (0: deterministic DDIM, 1: ancestral-like), got {eta!r}.")
  if spacing not in SPACINGS:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
  if method in solvers.METHODS:
    if isinstance(order, bool) or order not in range(1, solvers.MAX_ORDER[method] + 1):
      raise ValueError(f"order must be 1 to {solvers.MAX_ORDER[method]} for {method!r}, got {order!r}.")
    if spacing == "even":
      raise ValueError(f"spacing 'even' is the respaced chains' own; {method!r} takes 'auto' or one of "
                       f"{solvers.SPACINGS}.")
    return
  if chain_spacing(spacing) not in respacing.SPACINGS:
    raise ValueError(f"method {method!r} runs a respaced chain: spacing 'auto' (= 'even') or one of "
                     f"{respacing.SPACINGS[1:]}; {spacing!r} is for the solvers {solvers.METHODS}.")
  if method == analytic_dpm.METHOD:
    analytic_dpm.check(diffusion)
  if method == "ancestral" and diffusion.model_var_type == "learned" and num_kept < diffusion.num_timesteps:
    raise ValueError("model_var_type='learned' predicts the variance of one step of the full chain, not of a "
                     "respaced one; use method='ddim', all T steps, or a 'learned_range' model.")


def _chain(model_fn, diffusion, spaced, timesteps, rng, shape, *, num_run, x_init=None, first_index=0,
           clip_denoised=True, record_every=0, method="ancestral", eta=1.0, report=None):
  """Runs steps num_run − 1, …, 0 of `spaced` (a respacing of `diffusion`, timesteps[i] the original t of step i).

  report: None, or a trace-time hook report(done) (progress.py) called every few steps with the number of steps
  run so far (counting the current one; nothing depends on it, so it may fire as that step starts).
  """
  batch, image_shape = shape[0], tuple(shape[1:])
  indices = first_index + jnp.arange(batch)
  if x_init is None:
    x_init = per_example_normal(rng, indices, diffusion.num_timesteps, image_shape)
  chain = spaced
  convert_xprev = diffusion.model_mean_type == "xprev" and timesteps.shape[0] < diffusion.num_timesteps
  if convert_xprev:
    # An 'xprev' network predicts the posterior mean of one original step: read it as the x̂_0 it implies.
    chain = copy.copy(spaced)
    chain.model_mean_type = "xstart"

  chunk = record_every if record_every > 0 else num_run
  num_chunks = -(-num_run // chunk)
  pad = num_chunks * chunk - num_run
  every = progress_lib.loop_every(num_run)

  def step(x_t, i_scalar, t_scalar):
    if report is not None:
      jax.lax.cond((i_scalar >= 0) & (i_scalar % every == 0), lambda: report(num_run - i_scalar), lambda: None)
    def denoise():
      i = jnp.full((batch,), i_scalar, dtype=jnp.int32)
      t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
      output = model_fn(x_t, t)
      if convert_xprev:
        mean_out, var_out = diffusion.split_model_output(output)
        output = diffusion.predict_start_from_prev(x_t, t, mean_out)
        output = output if var_out is None else jnp.concatenate([output, var_out], axis=-1)
      if method == "ddim":
        noise = (jnp.zeros_like(x_t) if eta == 0
                 else per_example_normal(rng, indices, t_scalar, image_shape))
        return ddim_step(chain, output, x_t, i, noise, eta=eta, clip_denoised=clip_denoised)
      noise = per_example_normal(rng, indices, t_scalar, image_shape)
      return chain.p_sample(output, x_t, i, noise, clip_denoised)
    if not pad:
      return denoise()
    # i < 0 marks padding (so the steps split into whole chunks of record_every): skip the network there.
    return jax.lax.cond(i_scalar >= 0, denoise, lambda: (x_t, x_t))
  # Padding goes first so that every chunk ends on a real step and the last one ends at step 0.
  steps = jnp.arange(num_run - 1, -1, -1, dtype=jnp.int32)
  padding = jnp.full((pad,), -1, jnp.int32)
  step_is = jnp.concatenate([padding, steps]).reshape(num_chunks, chunk)
  step_ts = jnp.concatenate([padding, jnp.asarray(timesteps, jnp.int32)[steps]]).reshape(num_chunks, chunk)

  def run_chunk(x_t, chunk_steps):
    def inner(carry, i_and_t):
      x_prev, pred_xstart = step(carry[0], *i_and_t)
      return (x_prev, pred_xstart), None
    (x_t, pred_xstart), _ = jax.lax.scan(inner, (x_t, jnp.zeros_like(x_t)), chunk_steps)
    return x_t, (x_t, pred_xstart) if record_every > 0 else None

  x_0, recorded = jax.lax.scan(run_chunk, x_init, (step_is, step_ts))
  if record_every > 0:
    return x_0, dict(x_t=recorded[0], pred_xstart=recorded[1], t=step_ts[:, -1])
  return x_0


def sample_loop(model_fn, diffusion, rng, shape, *, x_init=None, start_t=None, first_index=0,
                clip_denoised=True, record_every=0, num_steps=None, method="ancestral", eta=1.0, order=2,
                spacing="auto", gamma=(), progress=None):
  """Runs the chain t = start_t, …, 0 and returns x_0 [B, H, W, C] (and, optionally, a trajectory).

  model_fn(x_t, t_B) → network output. By default the chain starts from x_T ~ N(0, I) at start_t = T − 1;
  pass x_init (an x at timestep start_t, e.g. from q_sample) to start midway (interpolation, rate–distortion).
  With record_every = k > 0 also returns a dict of x_t and x̂_0 after every k-th step ([n, B, H, W, C], the last
  entry being the final sample), the paper's progressive generation. Python ints start_t and record_every are
  static: call this inside `jax.jit` with them fixed.

  num_steps (None = all T) runs only the respaced timesteps respacing.chain_timesteps(T, num_steps, spacing)
  ('auto' = 'even'; 'leading' and 'trailing' as diffusers' DDIMScheduler); start_t must then be one of them, and
  the diffusion must be concrete (closed over, not a jit argument). method is 'ancestral'
  (the paper) or 'ddim' with noise scale eta ≥ 0 (ignored by 'ancestral'). num_steps, method and eta are static.
  method may also be one of the fast solvers (solvers.py: 'dpm_solver++', 'sde_dpm_solver++', 'unipc') of the
  given order, over num_steps timesteps of `spacing` ('auto' = 'logsnr'); they start from x_T (no x_init, start_t
  or record_every) and their randomness follows the same per-example scheme. method 'analytic_dpm' is the ancestral
  chain with Analytic-DPM's variances, from gamma: E‖ε̂‖²/d at each kept timestep (analytic_dpm.fit).

  progress: None (the default: the program has no callback), or fn(steps_done) called on the host every ~1% of
  the steps run (e.g. progress.Progress(…).update); the samples are the same either way.
  """
  total = diffusion.num_timesteps
  report = None if progress is None else progress_lib.host_hook(progress)
  if method in solvers.METHODS:
    if x_init is not None or start_t is not None or record_every:
      raise ValueError(f"method {method!r} runs from x_T only; x_init, start_t and record_every are for "
                       f"{CHAIN_METHODS}.")
    return _solver_chain(model_fn, diffusion, solver_plan(diffusion, num_steps, method, order, spacing), rng, shape,
                         first_index=first_index, method=method, clip_denoised=clip_denoised, report=report)
  spaced, timesteps = _respaced_chain(diffusion, num_steps, method, eta, order, spacing, gamma)
  if start_t is None:
    num_run = len(timesteps)
  elif not 0 <= start_t < total:
    raise ValueError(f"start_t must be in [0, {total - 1}], got {start_t}.")
  elif start_t not in timesteps:
    raise ValueError(f"start_t {start_t} is not one of the {len(timesteps)} respaced timesteps; pick one of "
                     "respacing.chain_timesteps(T, num_steps, spacing).")
  else:
    num_run = int(np.searchsorted(timesteps, start_t)) + 1
  return _chain(model_fn, diffusion, spaced, timesteps, rng, shape, num_run=num_run, x_init=x_init,
                first_index=first_index, clip_denoised=clip_denoised, record_every=record_every, method=method,
                eta=float(eta), report=report)


def _respaced_chain(diffusion, num_steps, method, eta, order, spacing, gamma):
  """The checked chain's (respaced diffusion, kept timesteps) for num_steps (None = all T) of `spacing`; for
  'analytic_dpm' the respaced diffusion draws with the variances of gamma."""
  num_kept = diffusion.num_timesteps if num_steps is None else num_steps
  check_sampler(diffusion, num_kept, method, eta, order, spacing)
  spaced, timesteps = respacing.respaced(diffusion, num_kept, chain_spacing(spacing))
  if method == analytic_dpm.METHOD:
    spaced = analytic_dpm.with_variances(spaced, analytic_dpm.optimal_variances(diffusion, timesteps, gamma))
  return spaced, timesteps


def solver_plan(diffusion, num_steps, method, order, spacing):
  """The fast solver's plan (solvers.plan) over num_steps timesteps of `spacing`, from the concrete diffusion."""
  check_sampler(diffusion, num_steps or 0, method, 0.0, order, spacing)
  if not num_steps:
    raise ValueError(f"method {method!r} needs num_steps >= 1 (network calls per sample; 10-20 is its range).")
  alphas_cumprod = np.asarray(diffusion.alphas_cumprod, np.float64)
  spacing = solvers.spacing_of(spacing)
  timesteps = solvers.solver_timesteps(diffusion.num_timesteps, num_steps, spacing, alphas_cumprod=alphas_cumprod)
  sigmas = solvers.karras_sigmas(alphas_cumprod, num_steps) if spacing == "karras" else None
  return solvers.plan(diffusion, timesteps, method=method, order=order, sigmas=sigmas)


def _solver_chain(model_fn, diffusion, plan, rng, shape, *, first_index, method, clip_denoised, report):
  """A fast solver's chain from x_T, with x_T and the noise of each step keyed per example as in `_chain`."""
  batch, image_shape = shape[0], tuple(shape[1:])
  indices = first_index + jnp.arange(batch)
  x_T = per_example_normal(rng, indices, diffusion.num_timesteps, image_shape)
  noise_fn = lambda i: per_example_normal(rng, indices, jnp.asarray(plan["t"])[i], image_shape)
  return solvers.run(model_fn, diffusion, x_T, plan, method=method, clip_denoised=clip_denoised, report=report,
                     noise_fn=noise_fn if method == "sde_dpm_solver++" else None)


def labels_of(labels, indices):
  """The class label of each sample index: labels cycled over the indices (NumPy or JAX, as indices are).

  Keyed by the global sample index, like the noise, so a sample's label does not depend on the batch split.
  """
  xp = np if isinstance(indices, np.ndarray) else jnp
  return xp.asarray(labels, xp.int32)[indices % len(labels)]


@dataclasses.dataclass(frozen=True)
class _UnetApply:
  model: Any  # Flax modules are hashable dataclasses, so equal models share compiled programs
  guidance_scale: float = 0.0

  def __call__(self, params, labels, x_t, t):
    # Labels only when given: any Flax module taking (x, t, train) works unconditionally (tests use stand-ins).
    apply = lambda x, tt, y: self.model.apply({"params": params}, x, tt, train=False,
                                              **({} if y is None else dict(labels=y)))
    if labels is None or not self.guidance_scale:
      return apply(x_t, t, labels)
    # Classifier-free guidance (Ho & Salimans 2021): the conditional and the null-label passes as one batch of 2B.
    null = jnp.full_like(labels, self.model.null_label)
    both = apply(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
    cond, uncond = both[:x_t.shape[0]], both[x_t.shape[0]:]
    c, w = x_t.shape[-1], self.guidance_scale  # the mean's channels; a learned variance is the conditional pass's
    guided = (1.0 + w) * cond[..., :c] - w * uncond[..., :c]
    return jnp.concatenate([guided, cond[..., c:]], axis=-1)


def unet_model_fn(model, params, labels=None, guidance_scale=0.0):
  """model_fn(x_t, t) of a Flax U-Net in inference mode (no dropout).

  A `jax.tree_util.Partial` whose arguments are the params: passed to a compiled program, they are its inputs,
  not constants baked into it, so new params of the same model reuse the program (figures.py relies on this).
  A class-conditional U-Net takes labels [B] (None: the null label, an unconditional prediction); guidance_scale
  w > 0 returns classifier-free guidance's (1 + w)·out(x, labels) − w·out(x, null) from one forward of 2B.
  """
  if guidance_scale and labels is None:
    raise ValueError("guidance_scale > 0 needs the labels to guide towards.")
  return jax.tree_util.Partial(_UnetApply(model, float(guidance_scale)), params, labels)


@functools.partial(jax.pmap, axis_name="batch", static_broadcasted_argnums=(0, 6, 7, 8, 9, 12),
                   in_axes=(None, 0, None, None, None, None, None, None, None, None, 0, 0, None))
def _sample_pmapped(model, params, diffusion, spaced, timesteps, rng, per_device_shape, clip_denoised, method, eta,
                    first_index, report_to, conditioning):
  # report_to: None (no callback in the program) or progress.first_device_only's per-device target ids.
  # For the fast solvers `spaced` is their plan (solver_plan) and `timesteps` is unused.
  # conditioning: None, or (labels, guidance_scale) of a class-conditional model, labels cycled over sample indices.
  report = None if report_to is None else functools.partial(progress_lib.to_target, report_to)
  if conditioning is None:
    model_fn = unet_model_fn(model, params)
  else:
    labels = labels_of(conditioning[0], first_index + jnp.arange(per_device_shape[0]))
    model_fn = unet_model_fn(model, params, labels, conditioning[1])
  if method in solvers.METHODS:
    return _solver_chain(model_fn, diffusion, spaced, rng, per_device_shape,
                         first_index=first_index, method=method, clip_denoised=clip_denoised, report=report)
  return _chain(model_fn, diffusion, spaced, timesteps, rng, per_device_shape,
                num_run=timesteps.shape[0], first_index=first_index, clip_denoised=clip_denoised, method=method,
                eta=eta, report=report)


def sample_sharded(model, params_replicated, diffusion, rng, num_samples, image_shape, *, first_index=0,
                   clip_denoised=True, num_steps=None, method="ancestral", eta=1.0, order=2, spacing="auto",
                   gamma=(), labels=(), guidance_scale=0.0, progress=None):
  """num_samples images [num_samples, H, W, C] from the chain, split over this host's local devices.

  params_replicated has a leading local-device axis. Sample i equals sample first_index + i of any other split.
  num_steps, method, eta and progress are as in sample_loop (the respacing happens here, outside pmap). Only the
  first local device calls progress, and with it this returns once the samples are computed. A class-conditional
  model draws sample i of class labels_of(labels, i), guided with guidance_scale; labels () = unconditional.
  """
  n = jax.local_device_count()
  devices.check_divisible("num_samples", num_samples, n, "local devices")
  if method in solvers.METHODS:
    spaced, timesteps = solver_plan(diffusion, num_steps, method, order, spacing), None
  else:
    spaced, timesteps = _respaced_chain(diffusion, num_steps, method, eta, order, spacing, gamma)
  per_device = num_samples // n
  starts = first_index + per_device * jnp.arange(n)
  conditioning = (tuple(int(y) for y in labels), float(guidance_scale)) if len(labels) else None
  if guidance_scale and conditioning is None:
    raise ValueError("guidance_scale > 0 needs labels (a class-conditional model, model.num_classes > 0).")
  run = lambda report_to: _sample_pmapped(model, params_replicated, diffusion, spaced, timesteps, rng,
                                          (per_device,) + tuple(image_shape), clip_denoised, method, float(eta),
                                          starts, report_to, conditioning)
  if progress is None:
    out = run(None)
  else:
    with progress_lib.target(progress) as target_id:
      out = run(progress_lib.first_device_only(target_id, n)).block_until_ready()  # the chain reports until done
  return out.reshape((num_samples,) + tuple(image_shape))
