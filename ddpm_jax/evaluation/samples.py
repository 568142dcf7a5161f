"""Samples on disk: a directory of uint8 NHWC `arr_0` .npz shards (and a PNG grid), written so that a rerun resumes.

Shard b holds global samples [b·B, (b+1)·B) (B the global batch), each host's part in its own file
(samples_<b>_host<h>.npz), so a restarted run skips finished shards and hosts never write the same file. FID, IS,
the sweep's sheet and the notebooks read them back with `load_samples`.
"""
import logging
import math
import os
import re

import flax
import jax
import numpy as np

from ddpm_jax import devices
from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import progress
from ddpm_jax import sampling


def write_sample_shards(model, params, diffusion, sampler, rng, num_samples, batch_size, image_shape, out_dir):
  """Writes num_samples images of (model, params) drawn by `sampler` to out_dir; returns out_dir.

  params: the (unreplicated) EMA params. Sample i's noise depends only on (rng, i), so the images do not depend on
  batch_size, devices or hosts. Shards already on disk are kept. Process 0 also writes grid.png of the first 64.
  """
  check_sizes(num_samples, batch_size)
  per_host = batch_size // jax.process_count()
  fileio.makedirs(out_dir)
  num_shards = -(-num_samples // batch_size)
  path_of = lambda b: os.path.join(out_dir, f"samples_{b:05d}_host{jax.process_index()}.npz")
  todo = [b for b in range(num_shards) if not fileio.exists(path_of(b))]
  steps = sampler.steps(diffusion.num_timesteps)
  # One count over every chain step of the shards to do: an ETA for the whole stage, updated from inside the chain.
  report = progress.Progress(f"Sampling {len(todo)} shards of {per_host} images", len(todo) * steps, "chain steps")
  replicated = flax.jax_utils.replicate(params) if todo else None
  for n, b in enumerate(todo):
    path, first = path_of(b), b * batch_size + jax.process_index() * per_host
    x = sampling.sample_sharded(model, replicated, diffusion, rng, per_host, image_shape, first_index=first,
                                progress=lambda done, base=n * steps: report.update(base + done),
                                **sampler.chain_kwargs())
    x = images.to_uint8(jax.device_get(x))[:max(0, min(per_host, num_samples - first))]
    # A conditional model's samples keep their classes beside them, as arr_1 (the layout of a labelled .npz source).
    labels = dict(arr_1=sampling.labels_of(sampler.labels, first + np.arange(len(x)))) if sampler.labels else {}
    fileio.save_npz(path, arr_0=x, **labels)  # atomic: a killed run never leaves a half-written shard under its name
    logging.info("Wrote shard %d/%d (%d images) to %s", b + 1, num_shards, len(x), path)
  if jax.process_index() == 0:
    first_shard = fileio.load_npz(shard_paths(out_dir)[0])["arr_0"]
    # Labels cycle over the samples: with one column per class, each column of the grid is one class.
    grid = images.make_grid(first_shard[:64], ncols=sampler.grid_columns)
    images.save_png(os.path.join(out_dir, "grid.png"), grid, upscale=max(1, 512 // grid.shape[0]))
  return out_dir


def check_sizes(num_samples, batch_size):
  """The one-line errors for a sample count or global batch the run cannot draw (before anything is loaded)."""
  if num_samples <= 0:
    raise ValueError(f"sampling.num_samples must be > 0, got {num_samples}.")
  devices.check_divisible("sampling.batch_size", batch_size, jax.device_count())


def shard_paths(out_dir):
  """The sample shards of out_dir in global sample order: by batch, then host (numerically: host10 after host9)."""
  def order(path):
    m = re.fullmatch(r"samples_(\d+)_host(\d+)\.npz", os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else (math.inf, 0)
  return sorted(fileio.glob(os.path.join(out_dir, "samples_*.npz")), key=order)


def load_samples(out_dir):
  """All samples of out_dir, uint8 [N, H, W, C], in global order."""
  return np.concatenate([fileio.load_npz(p)["arr_0"] for p in shard_paths(out_dir)])


def load_labels(out_dir):
  """The class of each sample of out_dir, int32 [N] in global order (a conditional model's samples only)."""
  return np.concatenate([fileio.load_npz(p)["arr_1"] for p in shard_paths(out_dir)])
