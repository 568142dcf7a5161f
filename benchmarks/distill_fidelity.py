"""How closely distilled students follow their first teacher, from the same noise.

  python benchmarks/distill_fidelity.py --config=configs/digits_distill.py --workdir=runs/digits_distill [--config.<field>=<value>]

A student of n steps is trained to land where its teacher's 2n steps land, and that teacher on the same path as its
own teacher, so perfect rounds would give every student the first teacher's samples: distill.start_steps clipped DDIM
steps ('trailing', η = 0) of the trained model. This prints the RMSE (in [−1, 1] pixels) between each student's
samples and the first teacher's, decoded from the same x_T, beside the teacher's own DDIM with as few steps. A round
whose loss an FID of a few thousand samples cannot see shows here in a few hundred: DDIM with η = 0 is deterministic,
so every difference is the student's (or, in the teacher's rows, that of fewer steps). Besides the RMSE, the median
of the per-sample RMSEs and the share of samples further than 0.25 (a different shape, not a blur).

Then, for the first round's student, where along the chain it misses: at each of its steps, the mean squared error
of its x̂ against the round's target on real training images noised to that step, beside the error of the teacher's
own x̂ taken as one step (what the student would score by copying its teacher).
"""
import argparse
import copy
import functools
import os

import common  # pylint: disable=g-bad-import-order  # also puts the repository on sys.path

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import distillation
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import sampling
from ddpm_jax import trained_params


FAR = 0.25  # per-sample RMSE beyond which a sample is another shape than the first teacher's, not a blur of it
SHEET_COLUMNS = 16  # samples per row of the --out sheet


def samples(config, workdir, num, batch, rng):
  """[num, H, W, C] samples in [−1, 1] of config.sampling (a 'distill/<n>' checkpoint or the trained model)."""
  config, workdir = distillation.student_run(config, workdir)
  model, params, _ = trained_params.load(config, workdir)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  s = config.sampling
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  run = jax.jit(lambda p, first: sampling.sample_loop(
      sampling.unet_model_fn(model, p), diffusion, rng, shape, first_index=first, num_steps=s.num_steps,
      method="ddim", eta=0.0, spacing="trailing", clip_denoised=bool(s.clip_denoised)))
  return np.concatenate([np.asarray(run(params, np.int32(first))) for first in range(0, num, batch)])[:num]


def fidelity_rows(config, workdir, num, batch, seed=0, shown=None):
  """[(sampler, network passes, RMSE to the first teacher's samples, median per-sample RMSE, share of samples
  further than FAR)]: the first teacher itself (0 by construction), the teacher's DDIM at each student's step count,
  and every student found in workdir/distill/. A dict `shown` receives each row's first SHEET_COLUMNS samples."""
  rng = jax.random.PRNGKey(seed)
  d = config.distill

  def of(checkpoint, steps):
    c = copy.deepcopy(config)
    c.sampling.checkpoint, c.sampling.num_steps = checkpoint, steps
    x = samples(c, workdir, num, batch, rng)
    if shown is not None:
      shown[checkpoint, steps] = x[:SHEET_COLUMNS]
    return x

  first = of(config.sampling.checkpoint, d.start_steps)

  def rmse(x):
    per_sample = np.sqrt(np.mean(np.square(x - first), axis=tuple(range(1, x.ndim))))
    return float(np.sqrt(np.mean(np.square(per_sample)))), float(np.median(per_sample)), float(np.mean(per_sample > FAR))

  rows = [(f"the first teacher: {d.start_steps} DDIM steps", d.start_steps, *rmse(first))]
  for steps in distillation.round_steps(d.start_steps, d.end_steps):
    rows.append((f"the teacher, {steps} DDIM steps", steps, *rmse(of(config.sampling.checkpoint, steps))))
    if os.path.isdir(os.path.join(distillation.round_dir(workdir, steps), "checkpoints")):
      rows.append((f"the {steps}-step student", steps, *rmse(of(f"{distillation.CHECKPOINT_PREFIX}{steps}", steps))))
  return rows


def step_errors(config, workdir, num, seed=0):
  """[(student step i, its timestep t, teacher's one-step error, student's error)] of the first round's student:
  mean squared x̂ error against the two-teacher-step target on `num` training images noised to t."""
  d = config.distill
  steps = d.start_steps // 2
  c = copy.deepcopy(config)
  model, teacher, _ = trained_params.load(c, workdir)
  c.sampling.checkpoint = f"{distillation.CHECKPOINT_PREFIX}{steps}"
  c, round_dir = distillation.student_run(c, workdir)
  _, student, _ = trained_params.load(c, round_dir)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  points, midpoints = distillation.round_points(distillation.grid(diffusion.num_timesteps, d.start_steps), steps)
  data = input_pipeline.batches(config.data, seed=seed, global_batch_size=num, start_step=0, num_local_devices=1)
  x = next(data)
  x = jnp.asarray(x[0] if isinstance(x, tuple) else x)[0]

  def x0_fn(params, parameterization):
    as_x0 = functools.partial(distillation.to_x0, parameterization=parameterization)
    return distillation.network_x0(model, params, diffusion, as_x0, config.sampling.clip_denoised, train=False)

  first_teacher = x0_fn(teacher, distillation.TEACHER_PARAMETERIZATION[config.diffusion.model_mean_type])
  first_student = x0_fn(student, distillation.student_parameterization(config, steps))

  @jax.jit
  def errors(i):
    t, t_mid, t_next = (jnp.full((x.shape[0],), jnp.asarray(a)[j]) for a, j in ((points, i), (midpoints, i),
                                                                                 (points, i - 1)))
    alpha, sigma = distillation.alpha_sigma(diffusion, t)
    z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * jax.random.normal(
        jax.random.fold_in(jax.random.PRNGKey(seed), i), x.shape)
    target = distillation.target(first_teacher, diffusion, z, t, t_mid, t_next)
    return jnp.mean(jnp.square(first_teacher(z, t) - target)), jnp.mean(jnp.square(first_student(z, t) - target))

  shown = sorted({steps, steps - 1, steps - 2, *range(steps, 0, -max(steps // 8, 1)), 1} - {0, -1}, reverse=True)
  return [(i, int(points[i]), *map(float, errors(i))) for i in shown]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", required=True, help="the config the workdir was trained and distilled with")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--out", default="", help="write OUT.png: the first 16 samples of each row, from the same x_T")
  args, overrides = common.parse_args_and_config_overrides(parser, argv)
  config = common.load_config(args.config, overrides)
  common.check_readable(parser, config, args.workdir)
  shown = {}
  rows = fidelity_rows(config, args.workdir, args.num_samples, args.batch_size, shown=shown)
  if args.out:
    # One row per table row, in its order (the first teacher, then each step count: the teacher's DDIM, the student).
    sheet = images.make_grid(images.to_uint8(np.concatenate(list(shown.values()))), ncols=SHEET_COLUMNS)
    images.save_png(f"{args.out}.png", sheet, upscale=max(1, 768 // sheet.shape[1]))
    print(f"wrote {args.out}.png: rows {', '.join(name for name, *_ in rows)}")
  print(f"{args.num_samples} samples from the same x_T; RMSE in [-1, 1] pixels to the first teacher's samples")
  print(f"| sampler | network passes | RMSE to the first teacher | median per sample | share further than {FAR} |")
  print("|---|---|---|---|---|")
  for name, passes, value, median, far in rows:
    print(f"| {name} | {passes} | {value:.4f} | {median:.4f} | {far:.1%} |")
  print(f"\nThe first round's student against its target, {args.num_samples} training images noised to each step")
  print("| student step | t | teacher's own x̂, one step: MSE | the student's x̂: MSE |\n|---|---|---|---|")
  for i, t, teacher_error, student_error in step_errors(config, args.workdir, args.num_samples):
    print(f"| {i} | {t} | {teacher_error:.5f} | {student_error:.5f} |")


if __name__ == "__main__":
  main()
