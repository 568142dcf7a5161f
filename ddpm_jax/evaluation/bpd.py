"""Bits/dim: the variational bound of every example (the paper's Table 1 NLL and its Table 2 terms), sharded to disk.

The bound of an example is diffusion.calc_bpd_loop on that example alone, its noise keyed by fold_in(rng, index):
the numbers do not depend on batch size, devices or hosts. `per_example_bound` is that computation (the
rate–distortion figure uses it too); `bits_per_dim` runs it over the local devices; `write_bpd_shards` runs a data
set through it in per-host shards that a rerun skips, and `read_bpd_shards` + `summarize_bpd` give the means.
"""
import functools
import logging
import math
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import devices
from ddpm_jax import fileio
from ddpm_jax import progress as progress_lib
from ddpm_jax import sampling


def per_example_bound(model_fn, diffusion, x_start, rng, indices, clip_denoised=True):
  """diffusion.calc_bpd_loop of each example of x_start [B, H, W, C] alone, keyed by fold_in(rng, indices[i]).

  Returns calc_bpd_loop's dict with a leading [B]: total_bpd, prior_bpd [B]; terms_bpd, mse_bt [B, T].
  """
  def one(x, i):
    out = diffusion.calc_bpd_loop(model_fn, x[None], jax.random.fold_in(rng, i), clip_denoised)
    return jax.tree.map(lambda a: a[0], out)
  return jax.vmap(one)(x_start, indices)


def _bpd_per_device(model, params, diffusion, rng, images_uint8, indices, report_to):
  """{total, prior, decoder, kl_terms} [b] of this device's images [b, H, W, C]; example i keyed by indices[i].

  report_to: None, or progress.first_device_only's target id of this device (the bound's steps done go there).
  """
  x_start = images_uint8.astype(jnp.float32) / 127.5 - 1.0
  model_fn = sampling.unet_model_fn(model, params)
  if report_to is not None:
    # The bound's scan (diffusion.calc_bpd_loop) runs t = T − 1, …, 0 and calls the network once per t, the same t
    # for every example (so the vmap leaves this unbatched): the network call is where to report from.
    net, num_t, every = model_fn, diffusion.num_timesteps, progress_lib.loop_every(diffusion.num_timesteps)
    def model_fn(x_t, t):
      jax.lax.cond(t[0] % every == 0, lambda: progress_lib.to_target(report_to, num_t - t[0]), lambda: None)
      return net(x_t, t)
  out = per_example_bound(model_fn, diffusion, x_start, rng, indices)
  terms = out["terms_bpd"]
  return dict(total=out["total_bpd"], prior=out["prior_bpd"], decoder=terms[:, 0], kl_terms=jnp.sum(terms[:, 1:], 1))


_bpd_pmapped = jax.pmap(_bpd_per_device, axis_name="batch", static_broadcasted_argnums=(0,),
                        in_axes=(None, 0, None, None, 0, 0, 0))


def bits_per_dim(model, params_replicated, diffusion, images, rng, *, first_index=0, progress=None):
  """The VLB in bits/dim of uint8 images [N, H, W, C] (scaled to [-1, 1], no flips), split over local devices.

  Returns float64 [N] arrays: total, prior (L_T), decoder (L_0, the t = 0 term) and kl_terms (L_1 + … + L_{T−1}).
  Example i draws its noise from fold_in(rng, first_index + i), so any split over calls or devices agrees.
  progress: None, or fn(steps_done) called on the host every ~1% of the T steps of the bound (values unchanged).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"need uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
  n, num_devices = len(images), jax.local_device_count()
  per_device = -(-n // num_devices)
  padded = np.zeros((per_device * num_devices,) + images.shape[1:], np.uint8)
  padded[:n] = images
  indices = (first_index + np.arange(per_device * num_devices, dtype=np.int32)).reshape(num_devices, per_device)
  run = functools.partial(_bpd_pmapped, model, params_replicated, diffusion, rng,
                          padded.reshape((num_devices, per_device) + images.shape[1:]), indices)
  if progress is None:
    out = run(None)
  else:
    with progress_lib.target(progress) as target_id:
      out = jax.block_until_ready(run(progress_lib.first_device_only(target_id, num_devices)))
  return {k: np.asarray(v, np.float64).reshape(-1)[:n] for k, v in out.items()}


def _bpd_slices(num_examples, batch_size):
  """(shard file name, host, first, end) of every non-empty per-host slice of every global batch."""
  hosts = jax.process_count()
  per_host = batch_size // hosts
  for b in range(-(-num_examples // batch_size)):
    for h in range(hosts):
      lo = min(b * batch_size + h * per_host, num_examples)
      hi = min(lo + per_host, num_examples)
      if hi > lo:
        yield f"bpd_{b:05d}_host{h}.npz", h, lo, hi


def _holds(path, lo, hi):
  """Whether the shard at path exists and holds exactly examples lo … hi − 1 (a half-read file counts as not)."""
  try:
    return fileio.exists(path) and np.array_equal(fileio.load_npz(path)["index"], np.arange(lo, hi))
  except (OSError, KeyError, ValueError, EOFError):
    return False


def write_bpd_shards(model, params, diffusion, source, num_examples, batch_size, rng, out_dir):
  """Per-example bits/dim of source[0:num_examples] into out_dir/bpd_<batch>_host<h>.npz, this host's slices only.

  A shard already holding the right example indices is kept, so a rerun resumes; one from another batch size or
  example count is recomputed.
  """
  devices.check_divisible("eval.bpd_batch_size", batch_size, jax.device_count())
  fileio.makedirs(out_dir)
  per_host = batch_size // jax.process_count()
  slices = list(_bpd_slices(num_examples, batch_size))
  todo = [(i, name, lo, hi) for i, (name, host, lo, hi) in enumerate(slices)
          if host == jax.process_index() and not _holds(os.path.join(out_dir, name), lo, hi)]
  steps = diffusion.num_timesteps
  report = progress_lib.Progress(f"bits/dim of {len(todo)} shards of {per_host} examples", len(todo) * steps,
                                 "bound steps")
  replicated = flax.jax_utils.replicate(params) if todo else None
  for n, (i, name, lo, hi) in enumerate(todo):
    images = np.stack([source[j] for j in range(lo, hi)])
    # Padding to the full per-host batch keeps one shape: the bound compiles once.
    padded = np.concatenate([images, np.zeros((per_host - len(images),) + images.shape[1:], np.uint8)])
    out = bits_per_dim(model, replicated, diffusion, padded, rng, first_index=lo,
                       progress=lambda done, base=n * steps: report.update(base + done))
    fileio.save_npz(os.path.join(out_dir, name), index=np.arange(lo, hi), **{k: v[:hi - lo] for k, v in out.items()})
    logging.info("bits/dim shard %d/%d (examples %d-%d): mean %.4f", i + 1, len(slices), lo, hi - 1,
                 out["total"][:hi - lo].mean())


def read_bpd_shards(out_dir, num_examples, batch_size):
  """All hosts' per-example results for source[0:num_examples]: dict of float64 [num_examples]."""
  parts = []
  for name, _, lo, hi in _bpd_slices(num_examples, batch_size):
    path = os.path.join(out_dir, name)
    if not _holds(path, lo, hi):
      raise RuntimeError(f"{path} is missing or does not hold examples {lo}-{hi - 1}; rerun the evaluation.")
    parts.append({k: v for k, v in fileio.load_npz(path).items() if k != "index"})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize_bpd(per_example):
  """Means (and the standard error of the total) of per-example bits/dim."""
  total = per_example["total"]
  row = dict(value=float(np.mean(total)),
             stderr=float(np.std(total, ddof=1) / math.sqrt(len(total))) if len(total) > 1 else None)
  row.update({k: float(np.mean(per_example[k])) for k in ("prior", "decoder", "kl_terms")})
  row["num_examples"] = int(len(total))
  return row
