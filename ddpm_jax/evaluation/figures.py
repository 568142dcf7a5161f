"""The paper's figures and its rate–distortion measurement (Ho et al. 2020, Table 4 and Figs. 5–8), as pure functions.

Timesteps are 0-indexed as everywhere in ddpm_jax (index t is the paper's t + 1); files written for people (the CSV)
use the paper's t. Every function takes model_fn(x_t, t_B) → network output and is deterministic given its rng.

model_fn may be a plain closure (its arrays are then baked into each compiled program as constants, fine for small
models) or a `jax.tree_util.Partial` whose arguments are the arrays, which are then passed to the compiled programs
as inputs; `sampling.unet_model_fn` builds that for a Flax U-Net. Everything runs on one device: call it from process 0.
"""
import csv
import dataclasses
import functools
import io
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import fileio
from ddpm_jax import images as images_lib
from ddpm_jax import sampling
from ddpm_jax.evaluation import bpd


# ---------------------------------------------------------------------------------------------------------------
# model_fn plumbing: a closure is a static argument of the compiled programs, a Partial's arrays are inputs.

@dataclasses.dataclass(frozen=True)
class _Static:
  fn: Callable  # hashed and compared by identity for closures: each new closure compiles anew


def _split_model(model_fn):
  leaves, treedef = jax.tree.flatten(model_fn)
  if all(isinstance(x, (jax.Array, np.ndarray, np.generic, int, float)) for x in leaves):
    return treedef, leaves
  return _Static(model_fn), []


def _join_model(model_def, leaves):
  return model_def.fn if isinstance(model_def, _Static) else jax.tree.unflatten(model_def, leaves)


# ---------------------------------------------------------------------------------------------------------------
# Rate–distortion (Table 4, Fig. 5).

@functools.partial(jax.jit, static_argnames=("model_def", "clip_denoised"))
def _bpd_terms(model_def, model_leaves, diffusion, x_start, rng, indices, clip_denoised):
  # One bound per example with its own key, as bits/dim's: results do not depend on batching.
  out = bpd.per_example_bound(_join_model(model_def, model_leaves), diffusion, x_start, rng, indices, clip_denoised)
  return out["terms_bpd"], out["prior_bpd"], out["mse_bt"]


def rate_distortion(model_fn, diffusion, x_start, rng, *, batch_size=None, first_index=0, clip_denoised=True):
  """The paper's rate–distortion curve of images x_start (floats in [-1, 1], [B, H, W, C]), from calc_bpd_loop.

  The receiver of Algorithm 3 holds x_t after getting x_T, …, x_t; at that point:
    rate = L_T + Σ_{s ≥ t} L_s in the paper's indices, i.e. prior_bpd + Σ_{s > t} terms_bpd[s] in 0-indexed ones
      (the decoder term L_0 is never part of the rate, so at t = 0 the rate is total_bpd − decoder_bpd);
    distortion = RMSE on the [0, 255] scale between x_0 and x̂_0(x_t), x_t ~ q(x_t | x_0): 127.5 · √(mean mse_bt),
      the root of the squared error averaged over examples and dimensions.
  The rate is averaged over examples. Example i draws its noise from fold_in(rng, first_index + i), as
  bpd.bits_per_dim does; batch_size bounds how many examples are run at once (one compile, last batch padded).

  Returns numpy arrays of length T ordered by reverse step (entry i is t = T − 1 − i): t (0-indexed), rate_bpd,
  distortion_rmse; and the means prior_bpd, decoder_bpd, total_bpd, and num_examples.
  """
  x_start = np.asarray(x_start, np.float32)
  n, T = len(x_start), diffusion.num_timesteps
  if n == 0:
    raise ValueError("rate_distortion needs at least one image.")
  batch = min(batch_size or n, n)
  model_def, model_leaves = _split_model(model_fn)
  rate_sum, mse_sum = np.zeros(T), np.zeros(T)
  prior_sum = decoder_sum = total_sum = 0.0
  for lo in range(0, n, batch):
    chunk = x_start[lo:lo + batch]
    real = len(chunk)
    chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], np.float32)])
    indices = first_index + lo + np.arange(batch, dtype=np.int32)
    terms, prior, mse = jax.device_get(_bpd_terms(model_def, model_leaves, diffusion, jnp.asarray(chunk), rng,
                                                  jnp.asarray(indices), clip_denoised))
    terms, prior, mse = (np.asarray(a, np.float64)[:real] for a in (terms, prior, mse))
    kl = terms.copy()
    kl[:, 0] = 0.0  # L_0 is the decoder, not a message the receiver gets
    after = np.cumsum(kl[:, ::-1], axis=1)[:, ::-1]  # after[:, t] = Σ_{s ≥ t} kl[:, s]
    rate = prior[:, None] + np.concatenate([after[:, 1:], np.zeros((real, 1))], axis=1)
    rate_sum += rate.sum(axis=0)
    mse_sum += mse.sum(axis=0)
    prior_sum += prior.sum()
    decoder_sum += terms[:, 0].sum()
    total_sum += (terms.sum(axis=1) + prior).sum()
  reverse = slice(None, None, -1)  # index t → reverse-step order
  return dict(t=np.arange(T)[reverse], rate_bpd=(rate_sum / n)[reverse],
              distortion_rmse=(127.5 * np.sqrt(mse_sum / n))[reverse], prior_bpd=prior_sum / n,
              decoder_bpd=decoder_sum / n, total_bpd=total_sum / n, num_examples=n)


def rate_distortion_plot(rd):
  """uint8 [H, W, 3] rendering of rate_distortion's output in the layout of the paper's Fig. 5.

  Uses matplotlib's Agg canvas directly (no pyplot state, safe in any thread or headless process).
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  steps = np.arange(1, len(rd["t"]) + 1)  # reverse process time T − t + 1 (paper's t)
  fig = Figure(figsize=(12, 3.4), dpi=100)
  panels = ((steps, rd["distortion_rmse"], "Reverse process steps (T − t + 1)", "Distortion (RMSE [0, 255])"),
            (steps, rd["rate_bpd"], "Reverse process steps (T − t + 1)", "Rate (bits/dim)"),
            (rd["rate_bpd"], rd["distortion_rmse"], "Rate (bits/dim)", "Distortion (RMSE [0, 255])"))
  for k, (x, y, xlabel, ylabel) in enumerate(panels):
    ax = fig.add_subplot(1, 3, k + 1)
    ax.plot(x, y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  return rendered(fig)


def rendered(fig):
  """uint8 [H, W, 3] of a matplotlib Figure, laid out and drawn on matplotlib's Agg canvas."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  canvas = FigureCanvasAgg(fig)
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_csv(path, header, rows):
  """A CSV file (local, gs:// or ram://) of a header and rows."""
  text = io.StringIO()
  w = csv.writer(text, lineterminator="\n")
  w.writerow(header)
  w.writerows(rows)
  fileio.write_text(path, text.getvalue())


def save_plot(path, draw):
  """Writes draw()'s uint8 image to path as PNG and returns it; without matplotlib, warns and returns None."""
  try:
    plot = draw()
  except ImportError:
    logging.warning("matplotlib is not installed: %s not written (pip install matplotlib)", path)
    return None
  images_lib.save_png(path, plot)
  return plot


def _write_rd(path_prefix, rd):
  """(paths written, the plot or None without matplotlib)."""
  csv_path = path_prefix + ".csv"
  write_csv(csv_path, ("t", "rate_bpd", "distortion_rmse"),
            [(int(t) + 1, f"{rate:.8g}", f"{dist:.8g}")
             for t, rate, dist in zip(rd["t"], rd["rate_bpd"], rd["distortion_rmse"])])
  plot = save_plot(path_prefix + ".png", lambda: rate_distortion_plot(rd))
  return ([csv_path] if plot is None else [csv_path, path_prefix + ".png"]), plot


def write_rate_distortion(path_prefix, rd):
  """Writes <prefix>.csv (t in the paper's 1-indexed convention, rate_bpd, distortion_rmse) and <prefix>.png.

  Any path fileio takes (local, gs://). Returns the paths written; without matplotlib the PNG is skipped with a
  warning (the CSV holds the numbers).
  """
  return _write_rd(path_prefix, rd)[0]


# ---------------------------------------------------------------------------------------------------------------
# Progressive generation (Fig. 6).

@functools.partial(jax.jit, static_argnames=("model_def", "shape", "record_every", "clip_denoised"))
def _trajectory(model_def, model_leaves, diffusion, rng, shape, record_every, clip_denoised):
  model_fn = _join_model(model_def, model_leaves)
  return sampling.sample_loop(model_fn, diffusion, rng, shape, clip_denoised=clip_denoised, record_every=record_every)


def progressive_generation(model_fn, diffusion, rng, shape, num_frames=10, *, clip_denoised=True):
  """uint8 grid: a row per sample of sample_loop(model_fn, diffusion, rng, shape), num_frames columns over time.

  Columns show x̂_0 predicted at evenly spaced points of the chain, the last column being the final sample x_0
  (the same images sample_loop returns for this rng). With T divisible by num_frames, column j < num_frames − 1
  is x̂_0 predicted from x_t at t = T − (j + 1)·T/num_frames; otherwise the nearest recorded steps are shown.
  """
  T = diffusion.num_timesteps
  num_frames = max(1, min(num_frames, T))
  record_every = max(1, T // num_frames)
  model_def, model_leaves = _split_model(model_fn)
  _, rec = _trajectory(model_def, model_leaves, diffusion, rng, tuple(shape), record_every, clip_denoised)
  rec = jax.device_get(rec)
  picks = np.round(np.linspace(0, len(rec["t"]) - 1, num_frames)).astype(int)
  frames = np.concatenate([rec["pred_xstart"][picks[:-1]], rec["x_t"][-1:]])  # [F, B, H, W, C]
  frames = images_lib.to_uint8(np.swapaxes(frames, 0, 1))
  return images_lib.make_grid(frames.reshape((-1,) + frames.shape[2:]), ncols=num_frames)


# ---------------------------------------------------------------------------------------------------------------
# Chains from a given x_t: shared latents (Fig. 7) and interpolation (Fig. 8).

def _check_t(t, diffusion, what):
  if not 0 <= t < diffusion.num_timesteps:
    raise ValueError(f"{what} must be in [0, {diffusion.num_timesteps - 1}] (0-indexed), got {t}.")
  return int(t)


def default_shared_latent_ts(num_timesteps):
  """The paper's t = 1000, 750, 500, 250 scaled to num_timesteps, 0-indexed (999, 749, 499, 249 for T = 1000)."""
  return tuple(sorted({max(0, round(num_timesteps * f) - 1) for f in (1.0, 0.75, 0.5, 0.25)}, reverse=True))


@functools.partial(jax.jit, static_argnames=("model_def", "ts", "num_samples", "clip_denoised"))
def _shared_latent_rows(model_def, model_leaves, diffusion, rng, x0, ts, num_samples, clip_denoised):
  model_fn = _join_model(model_def, model_leaves)
  rng_q, rng_p = jax.random.split(rng)
  rows = []
  for t in ts:  # one program for all rows: a chain per t (start_t is static), compiled together
    noise = jax.random.normal(jax.random.fold_in(rng_q, t), x0.shape)
    x_t = diffusion.q_sample(x0, jnp.full((1,), t, jnp.int32), noise)
    samples = sampling.sample_loop(model_fn, diffusion, jax.random.fold_in(rng_p, t), (num_samples,) + x0.shape[1:],
                                   x_init=jnp.repeat(x_t, num_samples, axis=0), start_t=t,
                                   clip_denoised=clip_denoised)
    rows.append(jnp.concatenate([x0, x_t, samples]))
  return jnp.stack(rows)  # [len(ts), num_samples + 2, H, W, C]


def shared_latent(model_fn, diffusion, rng, x_start, ts=None, num_samples=3, *, clip_denoised=True):
  """uint8 grid, a row per t in ts (0-indexed; default default_shared_latent_ts): x_0, x_t, then num_samples x_0's.

  x_start is one image in [-1, 1] ([H, W, C] or [1, H, W, C]). Row t encodes it once, x_t = q_sample(x_0, t, ε) with
  ε = normal(fold_in(rng_q, t)), then runs num_samples reverse chains from that same x_t: sample_loop with x_init
  = x_t repeated, start_t = t and key fold_in(rng_p, t), so sample i gets its own noise (example index i), where
  rng_q, rng_p = jax.random.split(rng). x_t is shown clipped to [-1, 1].
  """
  x0 = np.asarray(x_start, np.float32).reshape(np.shape(x_start)[-3:])[None]
  ts = default_shared_latent_ts(diffusion.num_timesteps) if ts is None else ts
  ts = tuple(_check_t(t, diffusion, "shared_latent's t") for t in ts)
  model_def, model_leaves = _split_model(model_fn)
  rows = _shared_latent_rows(model_def, model_leaves, diffusion, rng, x0, ts, num_samples, clip_denoised)
  cells = images_lib.to_uint8(jax.device_get(rows))
  return images_lib.make_grid(cells.reshape((-1,) + cells.shape[2:]), ncols=num_samples + 2)


@functools.partial(jax.jit, static_argnames=("model_def", "t", "clip_denoised"))
def _interpolate(model_def, model_leaves, diffusion, rng, x_a, x_b, lams, t, clip_denoised):
  model_fn = _join_model(model_def, model_leaves)
  rng_q, rng_p = jax.random.split(rng)
  t_b = jnp.full((x_a.shape[0],), t, jnp.int32)
  noise = jax.random.normal(rng_q, x_a.shape)  # the same ε encodes both images
  x_t_a, x_t_b = diffusion.q_sample(x_a, t_b, noise), diffusion.q_sample(x_b, t_b, noise)
  # vmap over λ with the same key and example indices: every λ is decoded with the same noise.
  decode = lambda lam: sampling.sample_loop(model_fn, diffusion, rng_p, x_a.shape, x_init=(1.0 - lam) * x_t_a
                                            + lam * x_t_b, start_t=t, clip_denoised=clip_denoised)
  return jax.vmap(decode)(lams)  # [L, P, H, W, C]


def default_interpolation_t(num_timesteps):
  """The paper's Fig. 8 setting, t = 500 of 1000, scaled and 0-indexed."""
  return max(0, round(num_timesteps / 2) - 1)


def interpolate(model_fn, diffusion, rng, x_a, x_b, t=None, num_points=8, *, clip_denoised=True):
  """uint8 grid, a row per pair: x_a, the decoded interpolants for λ = linspace(0, 1, num_points), x_b.

  x_a, x_b in [-1, 1], [H, W, C] or [P, H, W, C] (P pairs). Both are encoded to timestep t (0-indexed; default
  default_interpolation_t) with the same ε = normal(rng_q, shape), mixed as x̄_t = (1 − λ) x_t + λ x'_t, and each
  x̄_t decoded by sample_loop(…, rng_p, x_init=x̄_t, start_t=t) with the same chain noise for every λ (pair p uses
  example index p), where rng_q, rng_p = jax.random.split(rng).
  """
  x_a, x_b = (np.asarray(x, np.float32) for x in (x_a, x_b))
  if x_a.ndim == 3:
    x_a, x_b = x_a[None], x_b[None]
  if x_a.shape != x_b.shape:
    raise ValueError(f"x_a and x_b must have the same shape, got {x_a.shape} and {x_b.shape}.")
  t = default_interpolation_t(diffusion.num_timesteps) if t is None else _check_t(t, diffusion, "interpolate's t")
  model_def, model_leaves = _split_model(model_fn)
  lams = np.linspace(0.0, 1.0, num_points, dtype=np.float32)
  decoded = _interpolate(model_def, model_leaves, diffusion, rng, x_a, x_b, lams, t, clip_denoised)
  cells = np.concatenate([x_a[:, None], np.swapaxes(jax.device_get(decoded), 0, 1), x_b[:, None]],
                         axis=1)  # [P, L + 2, H, W, C]
  cells = images_lib.to_uint8(cells)
  return images_lib.make_grid(cells.reshape((-1,) + cells.shape[2:]), ncols=num_points + 2)


# ---------------------------------------------------------------------------------------------------------------

def _upscale(grid):
  return max(1, 512 // max(grid.shape[:2]))  # small images (8×8 digits, 32×32 CIFAR) stay legible


def write_figures(model_fn, diffusion, rng, data_images_uint8, out_dir, step, writer=None, *, num_samples=4,
                  num_frames=10, num_interpolation_points=8, num_interpolation_pairs=2, rd_batch_size=None):
  """Writes the paper's figures for one checkpoint step under out_dir; returns {name: path}.

  data_images_uint8 [N, H, W, C] (N ≥ 2): image 0 seeds the shared-latent figure, pairs (0, 1), (2, 3), … the
  interpolations, and all N are measured for the rate–distortion curve (N · T network passes, rd_batch_size at a
  time). Files: progressive_step_S.png, shared_latent_step_S.png, interpolation_step_S.png and
  rate_distortion_step_S.{csv,png} (S zero-padded to 8 digits as in eval/; out_dir may be gs://). With a clu
  MetricWriter the images also go to writer.write_images(step, …) under figures/<name>.
  """
  data = np.asarray(data_images_uint8)
  if data.dtype != np.uint8 or data.ndim != 4 or len(data) < 2:
    raise ValueError(f"need at least 2 uint8 images [N, H, W, C], got {data.dtype} {data.shape}")
  x = data.astype(np.float32) / 127.5 - 1.0
  rng_prog, rng_shared, rng_interp, rng_rd = jax.random.split(rng, 4)
  pairs = max(1, min(num_interpolation_pairs, len(x) // 2))
  grids = dict(
      progressive=progressive_generation(model_fn, diffusion, rng_prog, (num_samples,) + x.shape[1:], num_frames),
      shared_latent=shared_latent(model_fn, diffusion, rng_shared, x[0], num_samples=num_samples),
      interpolation=interpolate(model_fn, diffusion, rng_interp, x[0:2 * pairs:2], x[1:2 * pairs:2],
                                num_points=num_interpolation_points))
  paths = {}
  for name, grid in grids.items():
    paths[name] = os.path.join(out_dir, f"{name}_step_{step:08d}.png")
    images_lib.save_png(paths[name], grid, upscale=_upscale(grid))
    logging.info("Wrote %s", paths[name])

  rd = rate_distortion(model_fn, diffusion, x, rng_rd, batch_size=rd_batch_size)
  written, plot = _write_rd(os.path.join(out_dir, f"rate_distortion_step_{step:08d}"), rd)
  for path in written:
    paths["rate_distortion_" + os.path.splitext(path)[1][1:]] = path
  logging.info("Rate–distortion of %d images: rate %.4f bits/dim at distortion %.3f (t = 1); wrote %s",
               rd["num_examples"], rd["rate_bpd"][-1], rd["distortion_rmse"][-1], ", ".join(written))

  if writer is not None:
    summaries = {f"figures/{k}": np.repeat(np.repeat(g, _upscale(g), 0), _upscale(g), 1)[None]
                 for k, g in grids.items()}
    if plot is not None:
      summaries["figures/rate_distortion"] = plot[None]
    writer.write_images(step, summaries)
  return paths
