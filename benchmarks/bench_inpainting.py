"""Inpainting on the digits demo: ours (editing.inpaint, one compiled program) and diffusers' RePaintPipeline on the
same weights, the same held-out digits and the same masks, judged by the demo's classifier of the real digits.

  python benchmarks/bench_inpainting.py --workdir=runs/digits [--num=200 --mask=half --steps=250 --jumps=10]
                                       [--config=configs/digits.py --config.<field>=<value>]
  python benchmarks/bench_inpainting.py --tiny   # a 2-step model trained here, 8 digits, 4 steps: the logic only

The digits are the classifier's held-out ones (evaluation/digits_quality.py), so its reading of an inpainted digit
is not a memory of the original. Printed per side: the share of inpainted digits read as the original digit, the
RMS error against the original on the generated pixels (0–255), and seconds per image, measured in one run; beside
them the classifier on the originals and on the masked inputs (unknown pixels set to 0, the digits' background),
and what the known pixels alone say of the digit (known_pixels_alone): the share an exact inpainter would keep.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position  # also puts the repository on sys.path

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from ddpm_jax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import images  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import masks as masks_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import trained_params  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.evaluation import digits_quality  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.modes import edit  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_fast_samplers  # pylint: disable=g-import-not-at-top,wrong-import-position


def held_out_digits(num, image_size, seed=0):
  """(uint8 [num, S, S, 1] images, int [num] digits): the first num of the classifier's held-out split."""
  _, held_out = digits_quality.split(seed)
  index = np.sort(held_out)[:num]
  return digits_quality.real_digits(image_size)[index], digits_quality.labels()[index]


def ours(model, params, diffusion, inputs, masks, config):
  """(edited, seconds of the second of two identical runs): the first compiles into JAX's persistent cache, from
  which the timed one loads the program, so the time is the edit's, as PyTorch's is."""
  with tempfile.TemporaryDirectory() as cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    for _ in range(2):
      t0 = time.perf_counter()
      parts = edit.edit_images(model, params, diffusion, inputs, masks, jax.random.PRNGKey(config.seed), config.edit,
                               config.sampling.batch_size, config.sampling.clip_denoised)
      edited = images.to_uint8(np.concatenate([p[1] for p in parts]))
      seconds = time.perf_counter() - t0
  return edited, seconds


def theirs(unet_pt, config, inputs, masks, batch, eta):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  d, e = config.diffusion, config.edit
  scheduler = diffusers.RePaintScheduler(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
                                         beta_end=d.beta_end, beta_schedule="linear", eta=eta)
  pipe = diffusers.RePaintPipeline(unet=unet_pt, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  x = inputs.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
  m = masks.transpose(0, 3, 1, 2).astype(np.float32)
  out, t0 = [], time.perf_counter()
  for start in range(0, len(x), batch):
    result = pipe(torch.from_numpy(x[start:start + batch]), torch.from_numpy(m[start:start + batch]),
                  num_inference_steps=e.num_steps or d.num_timesteps, eta=eta, jump_length=e.jump_length,
                  jump_n_sample=e.jumps, generator=torch.Generator().manual_seed(start), output_type="np").images
    out.append(np.asarray(result))
  edited = np.clip(np.round(np.concatenate(out) * 255.0), 0, 255).astype(np.uint8).reshape(inputs.shape)
  return edited, time.perf_counter() - t0


def scores(classifier, edited, originals, labels, masks):
  unknown = masks < 0.5
  rms = float(np.sqrt(np.mean((edited.astype(float) - originals)[unknown] ** 2)))
  return float(np.mean(digits_quality.predicted_labels(classifier, edited) == labels)), rms


def blank(digits, masks):
  """The digits with their unknown pixels (mask < 0.5) set to 0, the digits' background."""
  return np.where(masks > 0.5, digits, 0).astype(np.uint8)


def known_pixels_alone(blanked, labels, mask_spec, seed):
  """How much of the label the known pixels alone hold: {classifier: (accuracy, mean probability of the true label)}
  of classifiers trained on the classifier's training digits masked alike, reading the masked held-out inputs.

  The mean probability estimates the share an exact sampler of the missing pixels keeps: a completion drawn from
  p(x | known pixels) is a y with probability p(y | known pixels). The reading classifier's own errors come on top.
  Two estimates of p(y | known): logistic regression (the demo classifier's C) and 5 nearest neighbours.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.neighbors import KNeighborsClassifier  # pylint: disable=g-import-not-at-top
  train, _ = digits_quality.split(seed)
  train_digits = digits_quality.real_digits(blanked.shape[1])[train]
  train_masks = masks_lib.from_spec(mask_spec, len(train), *blanked.shape[1:3], seed=seed + 1)
  x = digits_quality.to_features(blank(train_digits, train_masks))
  y = digits_quality.labels()[train]
  out = {}
  for name, classifier in (("logistic regression", LogisticRegression(C=digits_quality.C, max_iter=10_000)),
                           ("5 nearest neighbours", KNeighborsClassifier(5))):
    p = classifier.fit(x, y).predict_proba(digits_quality.to_features(blanked))
    out[name] = (float(np.mean(p.argmax(1) == labels)), float(np.mean(p[np.arange(len(labels)), labels])))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/digits")
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--num", type=int, default=200)
  parser.add_argument("--mask", default="half")
  parser.add_argument("--steps", type=int, default=250)
  parser.add_argument("--jumps", type=int, default=10)
  parser.add_argument("--jump_length", type=int, default=10)
  parser.add_argument("--batch", type=int, default=200)
  parser.add_argument("--eta", type=float, default=1.0, help="diffusers' RePaint η (1: σ² = β̃, DDPM-like)")
  parser.add_argument("--no_diffusers", action="store_true")
  parser.add_argument("--out", default="", help="write the numbers to OUT.json and a sheet of 16 digits to OUT.png")
  parser.add_argument("--tiny", action="store_true", help="a 2-step model trained here, 8 digits, 4 steps, 2 jumps")
  args, overrides = common.parse_args_and_config_overrides(parser, argv)

  if args.tiny:
    tmp = tempfile.TemporaryDirectory(prefix="bench_inpainting_")
    config, args.workdir = bench_fast_samplers.tiny_run(tmp.name, fid_reference=False)
    args.num, args.batch, args.steps, args.jumps, args.jump_length = 8, 8, 4, 2, 2
  else:
    config = common.load_config(args.config, overrides)
    if not args.no_diffusers and config.diffusion.model_mean_type != "eps":
      # RePaintScheduler reads every model output as ε: a v- or x-model would give noise, silently.
      parser.error(f"diffusers' RePaintScheduler reads only ε-models and {args.config} predicts "
                   f"{config.diffusion.model_mean_type!r}; add --no_diffusers to run ours alone.")
    common.check_readable(parser, config, args.workdir)
  config.edit.num_steps, config.edit.jumps, config.edit.jump_length = args.steps, args.jumps, args.jump_length
  config.sampling.batch_size = args.batch
  model, params, step = trained_params.load(config, args.workdir)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  originals, labels = held_out_digits(args.num, config.data.image_size, config.seed)
  masks = masks_lib.from_spec(args.mask, args.num, *originals.shape[1:3], seed=config.seed)
  classifier, accuracy = digits_quality.fit_classifier(config.seed)
  blanked = blank(originals, masks)
  rows = {"originals": (float(np.mean(digits_quality.predicted_labels(classifier, originals) == labels)), 0.0, None),
          "masked inputs": (*scores(classifier, blanked, originals, labels, masks), None)}
  edited, seconds = ours(model, params, diffusion, originals, masks, config)
  rows["ddpm-jax inpaint"] = (*scores(classifier, edited, originals, labels, masks), seconds / args.num)
  bands = [originals[:16], np.where(masks[:16] > 0.5, originals[:16], 128).astype(np.uint8), edited[:16]]
  if not args.no_diffusers:
    unet_pt = bench_fast_samplers.diffusers_unet(config, params, min(args.batch, args.num))
    theirs_edited, seconds = theirs(unet_pt, config, originals, masks, args.batch, args.eta)
    rows[f"diffusers RePaintPipeline (η = {args.eta:g})"] = (*scores(classifier, theirs_edited, originals, labels,
                                                                    masks), seconds / args.num)
    bands.append(theirs_edited[:16])
  print(f"Inpainting {args.num} held-out digits ('{args.mask}' mask), checkpoint step {step} of {args.workdir}; "
        f"RePaint over {args.steps} steps, jumps {args.jumps} × length {args.jump_length}; the classifier's "
        f"held-out accuracy {accuracy:.1%}.")
  print("| | read as the original digit | RMS error on the generated pixels | s per image |")
  print("|---|---|---|---|")
  for name, (share, rms, s) in rows.items():
    print(f"| {name} | {share:.1%} | {rms:.1f} | {'' if s is None else f'{s:.3f}'} |")
  bound = known_pixels_alone(blanked, labels, args.mask, config.seed)
  print("\nThe known pixels alone, read by classifiers trained on masked digits: the share an exact sampler of the "
        "missing pixels would keep is their mean probability of the true digit.")
  print("| classifier of the masked digits | accuracy | mean probability of the true digit |")
  print("|---|---|---|")
  for name, (accuracy_known, mean_p) in bound.items():
    print(f"| {name} | {accuracy_known:.1%} | {mean_p:.1%} |")
  if args.out:
    with open(f"{args.out}.json", "w", encoding="utf-8") as f:
      json.dump(dict(vars(args), step=step, classifier_accuracy=accuracy, rows=rows, known_pixels_alone=bound), f,
                indent=2)
    # Rows: the originals, the masked inputs (unknown pixels grey), ours, diffusers'.
    sheet = images.make_grid(np.concatenate(bands), ncols=min(16, args.num))
    images.save_png(f"{args.out}.png", sheet, upscale=max(1, 768 // sheet.shape[1]))
  return rows


if __name__ == "__main__":
  main()
