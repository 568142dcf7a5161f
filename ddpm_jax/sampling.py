"""The reverse chain (the paper's Algorithm 2) as one `lax.scan`, compiled once.

Randomness is per example: example i of a call draws x_T from fold_in(fold_in(rng, first_index + i), T) and its
step-t noise from fold_in(fold_in(rng, first_index + i), t). So a batch split over devices or hosts (each passing
its `first_index`) gives exactly the samples of one big batch, whatever the device count.
"""
import functools

import jax
import jax.numpy as jnp


def _per_example_normal(rng, indices, t, shape):
  """[len(indices), *shape] standard normals; row i depends only on (rng, indices[i], t)."""
  draw = lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), t), shape)
  return jax.vmap(draw)(indices)


def sample_loop(model_fn, diffusion, rng, shape, *, x_init=None, start_t=None, first_index=0,
                clip_denoised=True, record_every=0):
  """Runs the chain t = start_t, …, 0 and returns x_0 [B, H, W, C] (and, optionally, a trajectory).

  model_fn(x_t, t_B) → network output. By default the chain starts from x_T ~ N(0, I) at start_t = T − 1;
  pass x_init (an x at timestep start_t, e.g. from q_sample) to start midway (interpolation, rate–distortion).
  With record_every = k > 0 also returns a dict of x_t and x̂_0 after every k-th step ([n, B, H, W, C], the last
  entry being the final sample), the paper's progressive generation. Python ints start_t and record_every are
  static: call this inside `jax.jit` with them fixed.
  """
  num_steps = diffusion.num_timesteps if start_t is None else start_t + 1
  if not 1 <= num_steps <= diffusion.num_timesteps:
    raise ValueError(f"start_t must be in [0, {diffusion.num_timesteps - 1}], got {start_t}.")
  batch, image_shape = shape[0], tuple(shape[1:])
  indices = first_index + jnp.arange(batch)
  if x_init is None:
    x_init = _per_example_normal(rng, indices, diffusion.num_timesteps, image_shape)

  chunk = record_every if record_every > 0 else num_steps
  num_chunks = -(-num_steps // chunk)
  pad = num_chunks * chunk - num_steps

  def step(x_t, t_scalar):
    def denoise():
      t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
      noise = _per_example_normal(rng, indices, t_scalar, image_shape)
      return diffusion.p_sample(model_fn(x_t, t), x_t, t, noise, clip_denoised)
    if not pad:
      return denoise()
    # t < 0 marks padding (so the steps split into whole chunks of record_every): skip the network there.
    return jax.lax.cond(t_scalar >= 0, denoise, lambda: (x_t, x_t))
  # Padding goes first so that every chunk ends on a real step and the last one ends at t = 0.
  ts = jnp.concatenate([jnp.full((pad,), -1, jnp.int32), jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)])

  def run_chunk(x_t, chunk_ts):
    def inner(carry, t_scalar):
      x_prev, pred_xstart = step(carry[0], t_scalar)
      return (x_prev, pred_xstart), None
    (x_t, pred_xstart), _ = jax.lax.scan(inner, (x_t, jnp.zeros_like(x_t)), chunk_ts)
    return x_t, (x_t, pred_xstart) if record_every > 0 else None

  x_0, recorded = jax.lax.scan(run_chunk, x_init, ts.reshape(num_chunks, chunk))
  if record_every > 0:
    return x_0, dict(x_t=recorded[0], pred_xstart=recorded[1], t=ts.reshape(num_chunks, chunk)[:, -1])
  return x_0


def unet_model_fn(model, params):
  """model_fn(x_t, t) for a Flax U-Net in inference mode (no dropout)."""
  return lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)


@functools.partial(jax.pmap, axis_name="batch", static_broadcasted_argnums=(0, 4, 5), in_axes=(None, 0, None, None, None, None, 0))
def _sample_pmapped(model, params, diffusion, rng, per_device_shape, clip_denoised, first_index):
  return sample_loop(unet_model_fn(model, params), diffusion, rng, per_device_shape, first_index=first_index,
                     clip_denoised=clip_denoised)


def sample_sharded(model, params_replicated, diffusion, rng, num_samples, image_shape, *, first_index=0,
                   clip_denoised=True):
  """num_samples images [num_samples, H, W, C] from the chain, split over this host's local devices.

  params_replicated has a leading local-device axis. Sample i equals sample first_index + i of any other split.
  """
  n = jax.local_device_count()
  if num_samples % n:
    raise ValueError(f"num_samples {num_samples} is not divisible by the {n} local devices; use a multiple of {n}.")
  per_device = num_samples // n
  starts = first_index + per_device * jnp.arange(n)
  out = _sample_pmapped(model, params_replicated, diffusion, rng, (per_device,) + tuple(image_shape), clip_denoised,
                        starts)
  return out.reshape((num_samples,) + tuple(image_shape))
