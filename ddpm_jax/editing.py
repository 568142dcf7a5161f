"""Editing images with a trained DDPM, no retraining: RePaint inpainting and SDEdit, each one `lax.scan`.

Inpainting (RePaint, Lugmayr et al. 2022) runs the ancestral chain on the whole image, but after every step sets the
known pixels to the input noised to the same level, a draw of q(x_{i−1} | x_0); the network then generates the
unknown pixels in keeping with them. The unknown part sees each replacement only one step late, which harmonises
poorly, so RePaint also goes back up the chain: after every jump_length denoising steps it re-noises jump_length
steps, x_i ~ q(x_i | x_{i−1}), and redoes them, jumps − 1 times per block (repaint_schedule).

SDEdit (Meng et al. 2022) noises the input to an intermediate timestep, ~strength·T, and runs the chain back from
there: a small strength keeps the input's layout and colours, strength 1 keeps almost nothing of it.

Both run the chain respaced to num_steps (respacing.py, 'even'; None = all T) and draw their noise per example like
sampling.py, so a batch split over devices or hosts (each passing its first_index) gives the edits of one batch.
Inpainting's keys, fold_in(fold_in(rng, first_index + b), key) for example b:
  x_T: key T; the ancestral noise of step i on its first visit: key timesteps[i] (sampling.sample_loop's keys);
  every other draw at schedule position p: T + 1 + 2p (a revisit's ancestral noise or the re-noising), T + 2 + 2p
  (the known pixels' q_sample). So with nothing known and jumps = 1 it is sample_loop, draw for draw.
SDEdit draws x_start with key T (unused by a chain that starts below x_T) and then runs sample_loop.
"""
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import respacing
from ddpm_jax import sampling

SDEDIT_METHODS = ("ancestral", "ddim")  # the chains sample_loop can start midway


def repaint_schedule(num_steps, jumps, jump_length):
  """RePaint's walk over a num_steps chain, int [L]: after entry e the chain is at x_{e−1} (x_{−1}: the image).

  It starts at num_steps − 1: an entry below its predecessor (or the first) is the denoising step x_e → x_{e−1}, one
  above re-noises x_{e−2} → x_{e−1}. At each e = 0, jump_length, 2·jump_length, … below num_steps − jump_length the
  walk, once down at e, goes up jump_length entries and down again, jumps − 1 times. This is diffusers'
  RePaintScheduler.timesteps // (T // num_steps): diffusers keeps original t = e·(T // num_steps) (its 'leading'
  respacing) for chain index e, where this module calls the network at respacing's 'even' timesteps[e].
  """
  _check_schedule(num_steps, jumps, jump_length)
  walk = []
  for e in range(num_steps - 1, -1, -1):
    walk.append(e)
    if e % jump_length == 0 and e < num_steps - jump_length:
      up_and_down = list(range(e + 1, e + jump_length + 1)) + list(range(e + jump_length - 1, e - 1, -1))
      walk.extend(up_and_down * (jumps - 1))
  return np.asarray(walk, np.int64)


def _check_schedule(num_steps, jumps, jump_length):
  for name, value in (("jumps", jumps), ("jump_length", jump_length)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an int >= 1 (RePaint uses jumps=10, jump_length=10), got {value!r}.")
  # Without resampling (jumps = 1) the jump length is never used, so it may exceed a short chain.
  if jumps > 1 and jump_length > num_steps:
    raise ValueError(f"jump_length {jump_length} exceeds the chain's {num_steps} steps; lower jump_length or raise "
                     "num_steps.")


def _plan(walk, timesteps, total):
  """Per schedule position, int32 [L] each: (chain index i, denoise?, network t, key of the step's noise, key of
  the known part's noise). A re-noising entry e is the forward step x_{i−1} → x_i with i = e − 1."""
  before = np.append(walk[0] + 1, walk[:-1])
  down = walk < before
  index = np.where(down, walk, walk - 1)
  position = np.arange(len(walk))
  first = np.zeros(len(walk), bool)
  down_positions = np.flatnonzero(down)
  first[down_positions[np.unique(walk[down_positions], return_index=True)[1]]] = True
  step_key = np.where(first, np.asarray(timesteps)[index], total + 1 + 2 * position)
  known_key = total + 2 + 2 * position
  t = np.where(down, np.asarray(timesteps)[index], 0)
  return tuple(jnp.asarray(a, jnp.int32) for a in (index, down, t, step_key, known_key))


def _known(images, mask):
  """Bool [B, H, W, C]: which pixels are kept, from a mask of images' shape or [B, H, W, 1] (1 = known)."""
  channel_mask = tuple(images.shape[:-1]) + (1,)
  if tuple(mask.shape) not in (tuple(images.shape), channel_mask):
    raise ValueError(f"mask has shape {tuple(mask.shape)}; it must be the images' {tuple(images.shape)} or "
                     f"{channel_mask} (masks.py builds one).")
  return jnp.broadcast_to(mask, images.shape) > 0.5


def inpaint(model_fn, diffusion, images, mask, rng, *, num_steps=None, jumps=10, jump_length=10, clip_denoised=True,
            first_index=0):
  """RePaint: x_0 [B, H, W, C] equal to images [B, H, W, C] (in [−1, 1]) where mask is 1, generated where it is 0.

  mask: images' shape or [B, H, W, 1], 1 = known. model_fn(x_t, t_B) → network output, called at the original t
  of the respaced chain (num_steps, None = all T; diffusion concrete, i.e. closed over when jitted). jumps = 1 is
  replacement alone, jumps = jump_length = 10 the paper's setting (repaint_schedule: ~(2·jumps − 1)·num_steps calls).
  """
  total = diffusion.num_timesteps
  num_kept = total if num_steps is None else num_steps
  spaced, timesteps = respacing.respaced(diffusion, num_kept, "even")  # checks num_steps first
  sampling.check_sampler(diffusion, num_kept, "ancestral", 1.0)
  if diffusion.model_mean_type == "xprev" and num_kept < total:
    raise ValueError("model_mean_type='xprev' predicts one step of the full chain; inpaint with num_steps=None.")
  known = _known(images, mask)
  plan = _plan(repaint_schedule(num_kept, jumps, jump_length), timesteps, total)

  batch, image_shape = images.shape[0], tuple(images.shape[1:])
  indices = first_index + jnp.arange(batch)
  normal = lambda key: sampling.per_example_normal(rng, indices, key, image_shape)

  def step(x, position):
    i, down, t, step_key, known_key = position
    i_B = jnp.full((batch,), i, jnp.int32)

    def denoise(x_i):
      output = model_fn(x_i, jnp.full((batch,), t, jnp.int32))
      x_prev, _ = spaced.p_sample(output, x_i, i_B, normal(step_key), clip_denoised)
      known_prev = spaced.q_sample(images, jnp.maximum(i_B - 1, 0), normal(known_key))
      known_prev = jnp.where(i > 0, known_prev, images)  # after step 0 the known part is the image itself
      return jnp.where(known, known_prev, x_prev)

    def renoise(x_before):  # x_i ~ q(x_i | x_{i−1}) of the respaced chain
      beta = spaced.betas[i]
      return jnp.sqrt(1.0 - beta) * x_before + jnp.sqrt(beta) * normal(step_key)

    return jax.lax.cond(down, denoise, renoise, x), None

  x_T = normal(total)
  x_0, _ = jax.lax.scan(step, x_T, plan)
  return jnp.where(known, images, x_0)


def start_timestep(num_timesteps, num_steps, strength):
  """SDEdit's start: the largest timestep of the respaced ('even') chain that is ≤ strength·T (strength in (0, 1])."""
  if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
    raise ValueError(f"strength must be in (0, 1] (the fraction of the chain to rerun), got {strength!r}.")
  kept = respacing.chain_timesteps(num_timesteps, num_timesteps if num_steps is None else num_steps)
  # The small tolerance keeps e.g. 0.29·100 = 28.999… from losing timestep 29 to rounding.
  below = kept[kept <= np.floor(strength * num_timesteps + 1e-9)]
  if not below.size:
    raise ValueError(f"strength {strength} is below the chain's first timestep {kept[0]} (of T = {num_timesteps}); "
                     "raise strength or num_steps.")
  return int(below[-1])


def sdedit(model_fn, diffusion, images, strength, rng, *, num_steps=None, method="ancestral", eta=0.0,
           clip_denoised=True, first_index=0):
  """SDEdit: images [B, H, W, C] in [−1, 1] noised to start_timestep(T, num_steps, strength), then denoised by
  sample_loop's chain (method 'ancestral' or 'ddim' with eta) over num_steps respaced steps; returns x_0."""
  if method not in SDEDIT_METHODS:
    raise ValueError(f"sdedit runs a chain from midway: method must be one of {SDEDIT_METHODS}, got {method!r}.")
  total = diffusion.num_timesteps
  start_t = start_timestep(total, num_steps, strength)
  batch = images.shape[0]
  noise = sampling.per_example_normal(rng, first_index + jnp.arange(batch), total, tuple(images.shape[1:]))
  x_start = diffusion.q_sample(images, jnp.full((batch,), start_t, jnp.int32), noise)
  return sampling.sample_loop(model_fn, diffusion, rng, images.shape, x_init=x_start, start_t=start_t,
                              first_index=first_index, clip_denoised=clip_denoised, num_steps=num_steps,
                              method=method, eta=eta)
