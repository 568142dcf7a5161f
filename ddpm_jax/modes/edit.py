"""--mode=edit: inpaint (RePaint) or SDEdit images with the EMA params of any trained or converted model
(editing.py), in workdir/edit/step_N_<task>/.

Inputs: edit.inputs, a folder of images or an .npz (arr_0), resized like training data ('' = the first images of
config.data). Masks (inpainting): edit.masks, 'half', 'center', 'random', or a folder/.npz of masks (masks.py).
Writes edited.npz (arr_0 the results, arr_1 the inputs, arr_2 the masks as uint8 0/1) and sheet.png (rows of inputs,
masked inputs when inpainting, and results). A class-conditional model edits each image towards a class: its own
label (config.data's, an .npz's arr_1, or a folder's class sub-folder), or sampling.labels cycled over the images
when given, guided with sampling.guidance_scale; edited.npz then holds the labels as arr_3. Each batch is split over
this host's devices and the hosts, keyed per image like sampling, so the results do not depend on the split.
"""
import logging
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ddpm_jax import devices
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import editing
from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import masks as masks_lib
from ddpm_jax import progress
from ddpm_jax import sampling
from ddpm_jax import trained_params

TASKS = ("inpaint", "sdedit")


def task_tag(edit_config, sampling_config=None, num_classes=0):
  """The output directory's suffix, naming the task and its settings, e.g. 'inpaint_half_250_j10x10'; for a
  conditional model also the guidance scale and any sampling.labels, e.g. 'sdedit_0.5_250_w3.0_labels8'."""
  e = edit_config
  steps = e.num_steps or "all"
  if e.task == "inpaint":
    mask = e.masks if e.masks in masks_lib.NAMES else os.path.splitext(os.path.basename(e.masks.rstrip("/")))[0]
    tag = f"inpaint_{mask}_{steps}_j{e.jumps}x{e.jump_length}"
  else:
    tag = f"sdedit_{e.strength:g}_{steps}"
  if not num_classes:
    return tag
  labels = tuple(sampling_config.labels)
  return f"{tag}_w{float(sampling_config.guidance_scale)}" + ("_labels" + "-".join(map(str, labels)) if labels else "")


def load_inputs(config):
  """(uint8 [edit.num_images, H, W, C], int32 labels [N] or None): edit.inputs (a folder or .npz), or config.data's
  first examples. A conditional model's labels are sampling.labels cycled over the images when given, else the
  inputs' own; an unconditional model's are None."""
  e, data, num_classes = config.edit, config.data, config.model.num_classes
  given = tuple(config.sampling.labels)
  own = num_classes if num_classes and not given else 0  # read the inputs' labels with them
  if e.inputs:
    source = "folder" if fileio.isdir(e.inputs) else "npz"
    data = ml_collections.ConfigDict(dict(data.to_dict(), source=source, path=e.inputs))
  try:
    source = input_pipeline.make_source(data, own)
  except ValueError as err:
    if not own:
      raise
    raise ValueError(f"{err} A conditional model edits towards each input's label; or give the classes in "
                     "sampling.labels.") from None
  if len(source) < e.num_images:
    raise ValueError(f"edit.num_images = {e.num_images} but the inputs hold {len(source)} images; lower "
                     "edit.num_images or add images.")
  items = [source[i] for i in range(e.num_images)]
  if own:
    return np.stack([image for image, _ in items]), np.array([label for _, label in items], np.int32)
  return np.stack(items), sampling.labels_of(given, np.arange(e.num_images)) if num_classes else None


def _edit_fn(model, diffusion, rng, edit_config, clip_denoised, guidance_scale):
  """pmap over local devices of (params, images, masks, first_index, labels or None) → edited images, for
  edit_config's task."""
  e = edit_config
  num_steps = e.num_steps or None

  def edit(params, x, mask, first_index, labels):
    model_fn = sampling.unet_model_fn(model, params, labels, guidance_scale)
    if e.task == "inpaint":
      return editing.inpaint(model_fn, diffusion, x, mask, rng, num_steps=num_steps, jumps=e.jumps,
                             jump_length=e.jump_length, clip_denoised=clip_denoised, first_index=first_index)
    return editing.sdedit(model_fn, diffusion, x, e.strength, rng, num_steps=num_steps, clip_denoised=clip_denoised,
                          first_index=first_index)
  return jax.pmap(edit, in_axes=(None, 0, 0, 0, 0))


def edit_images(model, params, diffusion, inputs, masks, rng, edit_config, batch_size, clip_denoised=True,
                labels=None, guidance_scale=0.0):
  """The edits of uint8 inputs [N, H, W, C] (masks float [N, H, W, 1], 1 = known), float in [−1, 1], this host's
  share of each batch of batch_size (global) images; returns (first indices, edited) of this host's rows. A
  class-conditional model takes labels int32 [N] (each image's class) and classifier-free guidance_scale."""
  n_dev, hosts = jax.local_device_count(), jax.process_count()
  devices.check_divisible("sampling.batch_size", batch_size, n_dev * hosts)
  per_host = batch_size // hosts
  fn = _edit_fn(model, diffusion, rng, edit_config, clip_denoised, guidance_scale)
  x_all = inputs.astype(np.float32) / 127.5 - 1.0
  batches = range(0, len(inputs), batch_size)
  report = progress.Progress(f"Editing {len(inputs)} images ({edit_config.task})", len(batches), "batches")
  done = []
  for k, start in enumerate(batches):
    first = start + jax.process_index() * per_host
    rows = np.arange(first, first + per_host)
    take = np.minimum(rows, len(inputs) - 1)  # the last batch is padded with the last image, then cut
    split = lambda a: a[take].reshape((n_dev, per_host // n_dev) + a.shape[1:])
    starts = first + (per_host // n_dev) * np.arange(n_dev)
    out = fn(params, split(x_all), split(masks), starts, None if labels is None else split(labels))
    keep = rows < len(inputs)
    done.append((rows[keep], np.asarray(jax.device_get(out)).reshape((per_host,) + inputs.shape[1:])[keep]))
    report.update(k + 1)
  return done


def run(config, workdir):
  """Edits the inputs and writes the results; returns the output directory."""
  e = config.edit
  model, params, step = trained_params.load(config, workdir)
  inputs, labels = load_inputs(config)
  n, h, w = inputs.shape[:3]
  masks = (masks_lib.from_spec(e.masks, n, h, w, seed=config.seed) if e.task == "inpaint"
           else np.zeros((n, h, w, 1), np.float32))
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  tag = task_tag(e, config.sampling, config.model.num_classes)
  out_dir = os.path.join(workdir, "edit", f"step_{step:08d}_{tag}")
  logging.info("Editing %d images (%s) with the EMA params of step %d into %s", n, tag, step, out_dir)
  guidance_scale = config.sampling.guidance_scale if labels is not None else 0.0
  parts = edit_images(model, params, diffusion, inputs, masks, rng, e, config.sampling.batch_size,
                      config.sampling.clip_denoised, labels, guidance_scale)
  fileio.makedirs(out_dir)
  host_file = os.path.join(out_dir, f"part_host{jax.process_index()}.npz")
  fileio.save_npz(host_file, index=np.concatenate([p[0] for p in parts]),
                  edited=images.to_uint8(np.concatenate([p[1] for p in parts])))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("edit: parts written")
  if jax.process_index() == 0:
    edited = np.zeros_like(inputs)
    for path in fileio.glob(os.path.join(out_dir, "part_host*.npz")):
      part = fileio.load_npz(path)
      edited[part["index"]] = part["edited"]
    fileio.save_npz(os.path.join(out_dir, "edited.npz"), arr_0=edited, arr_1=inputs,
                    arr_2=(masks > 0.5).astype(np.uint8), **({} if labels is None else dict(arr_3=labels)))
    sheet = write_sheet(inputs, masks if e.task == "inpaint" else None, edited, os.path.join(out_dir, "sheet.png"))
    logging.info("Wrote %s and %s", os.path.join(out_dir, "edited.npz"), sheet)
  return out_dir


def write_sheet(inputs, masks, edited, path, per_row=16):
  """A PNG of up to per_row images per band: inputs, masked inputs (unknown pixels mid-grey; not for masks None),
  results."""
  shown = min(per_row, len(inputs))
  bands = [inputs[:shown]]
  if masks is not None:
    bands.append(np.where(masks[:shown] > 0.5, inputs[:shown], np.uint8(128)).astype(np.uint8))
  sheet = images.make_grid(np.concatenate(bands + [edited[:shown]]), ncols=shown)
  images.save_png(path, sheet, upscale=max(1, 512 // sheet.shape[1]))
  return path

