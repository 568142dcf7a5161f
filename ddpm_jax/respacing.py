"""Respaced timesteps (improved DDPM, Nichol & Dhariwal 2021): a shorter chain over a subsequence of t.

Keeping steps k_0 < … < k_{n−1} of a T-step diffusion and setting β'_i = 1 − ᾱ_{k_i} / ᾱ_{k_{i−1}} (ᾱ_{k_{−1}} = 1)
gives an n-step diffusion whose ᾱ'_i equals ᾱ_{k_i}: its x_i has exactly the marginal of the original x_{k_i}, so a
network trained on the T-step chain can be used at step i when it is told the original timestep k_i.
"""
import jax
import numpy as np

from ddpm_jax import diffusion as diffusion_lib

SPACINGS = ("even", "leading", "trailing")  # of the respaced chains (ancestral, DDIM); the solvers' are in solvers.py


def spaced_timesteps(num_timesteps, num_steps):
  """The kept original timesteps, increasing int32 [num_steps]: k_i = round(i·(T−1)/(n−1)), halves rounded up.

  Evenly spaced and always holding 0 and T−1 (for n ≥ 2; n = 1 keeps only T−1, a single x_T → x̂_0 step). Exact
  integer arithmetic, so the steps are distinct and n = T keeps every step.
  """
  _check_num_steps(num_steps, num_timesteps)
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  i = np.arange(num_steps, dtype=np.int64)
  return ((2 * i * (num_timesteps - 1) + (num_steps - 1)) // (2 * (num_steps - 1))).astype(np.int32)


def chain_timesteps(num_timesteps, num_steps, spacing="even"):
  """The kept timesteps of a respaced chain, increasing int32 [num_steps].

  'even': spaced_timesteps (0 and T − 1 always kept). 'leading' and 'trailing': diffusers' DDIMScheduler and
  DDPMScheduler `timestep_spacing` (steps_offset = 0): 'leading' is k·(T // n) for k = 0, …, n − 1 (it never
  reaches T − 1: the chain starts lower, from pure noise, as diffusers' does); 'trailing' is round(T − k·T/n) − 1 for
  k = n − 1, …, 0 (from T − 1 down to T/n − 1: the last step jumps to x_0 from there).
  """
  _check_num_steps(num_steps, num_timesteps)
  T, n = num_timesteps, num_steps
  if spacing == "even":
    return spaced_timesteps(T, n)
  if spacing == "leading":
    return (np.arange(n, dtype=np.int64) * (T // n)).astype(np.int32)
  if spacing == "trailing":
    return (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[::-1].astype(np.int32)
  raise ValueError(f"Unknown respaced-chain spacing {spacing!r}; choose one of {SPACINGS}.")


def respaced(diffusion, num_steps, spacing="even"):
  """(n-step GaussianDiffusion over the kept steps, timestep_map int32 [n]: respaced index → original t).

  Call the network with timestep_map[i] at respaced step i. num_steps = T returns `diffusion` itself. The betas are
  recomputed in float64 from the diffusion's float32 tables, so ᾱ' matches ᾱ at the kept steps to ~1e-7 relative.
  Needs a concrete diffusion (not a jit/pmap argument). The mean and variance types carry over: 'learned_range' then
  interpolates between β' and β̃' of the new chain (as improved DDPM does); 'xprev' and 'learned' outputs describe
  one step of the original chain, which sampling.py converts or rejects.
  """
  total = diffusion.num_timesteps
  kept = chain_timesteps(total, num_steps, spacing)  # spacing: one of SPACINGS (chain_timesteps)
  if num_steps == total:
    return diffusion, kept
  alphas_cumprod = float64_alphas_cumprod(diffusion)[kept]
  new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
  spaced = diffusion_lib.GaussianDiffusion(new_betas, diffusion.model_mean_type, diffusion.model_var_type,
                                           diffusion.loss_type)
  return spaced, kept


def float64_alphas_cumprod(diffusion):
  """ᾱ [T] in float64 from a concrete diffusion's float32 tables, to ~1e-7 relative (1 − ᾱ too, even near t = 0)."""
  try:
    betas = np.asarray(diffusion.betas, dtype=np.float64)
    stored_alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("respacing needs a concrete diffusion: respace outside jit/pmap or close over the diffusion "
                     "instead of passing it as an argument.") from None
  # Only float32 tables are stored. 1 − β_t keeps α_t to ~1e-7 relative unless β_t is near 1 (cosine's 0.999 would
  # be off by ~1e-5); there the ratio of the stored ᾱ is the precise one.
  alphas = np.where(betas < 0.5, 1.0 - betas, stored_alphas_cumprod / np.append(1.0, stored_alphas_cumprod[:-1]))
  return np.cumprod(alphas)


def _check_num_steps(num_steps, num_timesteps):
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(f"num_steps must be an int in [1, {num_timesteps}], got {num_steps!r}.")
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the diffusion's T), got {num_steps}.")
