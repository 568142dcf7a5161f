"""--mode=sample: draw samples from a trained (or converted) model's EMA params and write .npz shards + a grid."""
import logging
import math
import os
import re

import flax
import jax
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import progress
from ddpm_jax import sampling
from ddpm_jax import train_step


def load_ema_params(config, workdir):
  """EMA params of the latest checkpoint in workdir/checkpoints; one-line error if there is none."""
  model = train_step.create_model(config)
  tx, _ = train_step.create_optimizer(config.optim)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  abstract = jax.eval_shape(lambda: train_step.create_train_state(jax.random.PRNGKey(0), model, tx, image_shape))
  if config.sampling.get("checkpoint", "latest") == "best_fid":
    from ddpm_jax import fid_monitor  # pylint: disable=g-import-not-at-top
    params, info = fid_monitor.restore_best(workdir, abstract.params)
    logging.info("Best-FID EMA params of step %d (FID %.3f during training)", info["step"], info["fid"])
    return model, params, int(info["step"])
  if config.sampling.get("checkpoint", "latest") != "latest":
    raise ValueError(f"sampling.checkpoint must be 'latest' or 'best_fid', got {config.sampling.checkpoint!r}.")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  restored = None
  if fileio.isdir(ckpt_dir):
    restored = checkpointing.Checkpointer(ckpt_dir).restore(abstract)
  if restored is None and config.get("restore_from"):
    from ddpm_jax import convert  # pylint: disable=g-import-not-at-top  # only for converted release weights
    return model, convert.load_converted(config.restore_from, abstract.params, config), 0
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first (--mode=train), point --workdir at a "
                            "trained run, or pass converted weights with --config.restore_from=DIR.")
  state, _ = restored
  return model, state.ema_params, int(state.step)


def sampler_kwargs(config):
  """sampling.sample_sharded's sampler arguments from config.sampling (configs older than these fields: defaults)."""
  s = config.sampling
  return dict(clip_denoised=s.get("clip_denoised", True), num_steps=s.get("num_steps", 0) or None,
              method=s.get("method", "ancestral"), eta=s.get("eta", 0.0))


def chain_steps(config):
  """Network evaluations per sample of the configured sampler (T unless respaced)."""
  return sampler_kwargs(config)["num_steps"] or config.diffusion.num_timesteps


def sampler_tag(config):
  """'' for the paper's chain, else e.g. '_ddim50_eta0.0': outputs of different samplers never share a directory."""
  kw = sampler_kwargs(config)
  if kw["num_steps"] is None and kw["method"] == "ancestral":
    return ""
  return f"_{kw['method']}{chain_steps(config)}" + (f"_eta{kw['eta']}" if kw["method"] == "ddim" else "")


def sample_to_dir(config, workdir, out_dir=None):
  """Writes config.sampling.num_samples images as uint8 NHWC `arr_0` .npz shards and a PNG grid; returns out_dir.

  Shard b holds global samples [b·B, (b+1)·B) (B = sampling.batch_size), this host's part in its own file, so a
  restarted run skips finished shards and hosts never write the same file.
  """
  num, batch = config.sampling.num_samples, config.sampling.batch_size
  if num <= 0:
    raise ValueError(f"sampling.num_samples must be > 0, got {num}.")
  per_host = batch // jax.process_count()
  if batch % (jax.process_count() * jax.local_device_count()):
    raise ValueError(f"sampling.batch_size {batch} is not divisible by the {jax.device_count()} devices; "
                     f"use a multiple of {jax.device_count()}.")
  model, params, step = load_ema_params(config, workdir)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  out_dir = out_dir or os.path.join(workdir, "samples", f"step_{step:08d}{sampler_tag(config)}")
  fileio.makedirs(out_dir)
  replicated = flax.jax_utils.replicate(params)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  num_shards = -(-num // batch)
  path_of = lambda b: os.path.join(out_dir, f"samples_{b:05d}_host{jax.process_index()}.npz")
  todo = [b for b in range(num_shards) if not fileio.exists(path_of(b))]
  steps = chain_steps(config)
  # One count over every chain step of the shards to do: an ETA for the whole stage, updated from inside the chain.
  report = progress.Progress(f"Sampling {len(todo)} shards of {per_host} images", len(todo) * steps, "chain steps")
  for n, b in enumerate(todo):
    path, first = path_of(b), b * batch + jax.process_index() * per_host
    x = sampling.sample_sharded(model, replicated, diffusion, rng, per_host, shape, first_index=first,
                                progress=lambda done, base=n * steps: report.update(base + done),
                                **sampler_kwargs(config))
    x = images.to_uint8(jax.device_get(x))[:max(0, min(per_host, num - first))]
    fileio.save_npz(path, arr_0=x)  # atomic: a killed run never leaves a half-written shard under the final name
    logging.info("Wrote shard %d/%d (%d images) to %s", b + 1, num_shards, len(x), path)
  if jax.process_index() == 0:
    first_shard = fileio.load_npz(sample_shard_paths(out_dir)[0])["arr_0"]
    grid = images.make_grid(first_shard[:64])
    images.save_png(os.path.join(out_dir, "grid.png"), grid, upscale=max(1, 512 // grid.shape[0]))
  return out_dir


def sample_shard_paths(out_dir):
  """sample_to_dir's shard files in global sample order: by batch, then host (numerically: host10 after host9)."""
  def order(path):
    m = re.fullmatch(r"samples_(\d+)_host(\d+)\.npz", os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else (math.inf, 0)
  return sorted(fileio.glob(os.path.join(out_dir, "samples_*.npz")), key=order)


def load_samples(out_dir):
  """All samples written by sample_to_dir, uint8 [N, H, W, C], in global order."""
  return np.concatenate([fileio.load_npz(p)["arr_0"] for p in sample_shard_paths(out_dir)])
