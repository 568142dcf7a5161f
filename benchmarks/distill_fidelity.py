"""How closely distilled students follow their first teacher, from the same noise.

  python benchmarks/distill_fidelity.py --config=configs/digits_distill.py --workdir=runs/digits_distill

A student of n steps is trained to land where its teacher's 2n steps land, and that teacher on the same path as its
own teacher, so perfect rounds would give every student the first teacher's samples: distill.start_steps clipped DDIM
steps ('trailing', η = 0) of the trained model. This prints the RMSE (in [−1, 1] pixels) between each student's
samples and the first teacher's, decoded from the same x_T, beside the teacher's own DDIM with as few steps. A round
whose loss an FID of a few thousand samples cannot see shows here in a few hundred: DDIM with η = 0 is deterministic,
so every difference is the student's (or, in the teacher's rows, that of fewer steps).
"""
import argparse
import copy
import os

import common  # pylint: disable=unused-import  # puts the repository on sys.path

import jax
import numpy as np

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import distillation
from ddpm_jax import sampling
from ddpm_jax import trained_params


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


def fidelity_rows(config, workdir, num, batch, seed=0):
  """[(sampler, network passes, RMSE to the first teacher's samples)]: the first teacher itself (0 by construction),
  the teacher's DDIM at each student's step count, and every student found in workdir/distill/."""
  rng = jax.random.PRNGKey(seed)
  d = config.distill

  def of(checkpoint, steps):
    c = copy.deepcopy(config)
    c.sampling.checkpoint, c.sampling.num_steps = checkpoint, steps
    return samples(c, workdir, num, batch, rng)

  first = of(config.sampling.checkpoint, d.start_steps)
  rmse = lambda x: float(np.sqrt(np.mean(np.square(x - first))))
  rows = [(f"the first teacher: {d.start_steps} DDIM steps", d.start_steps, rmse(first))]
  for steps in distillation.round_steps(d.start_steps, d.end_steps):
    rows.append((f"the teacher, {steps} DDIM steps", steps, rmse(of(config.sampling.checkpoint, steps))))
    if os.path.isdir(os.path.join(distillation.round_dir(workdir, steps), "checkpoints")):
      rows.append((f"the {steps}-step student", steps, rmse(of(f"{distillation.CHECKPOINT_PREFIX}{steps}", steps))))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", required=True, help="the config the workdir was trained and distilled with")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=128)
  args = parser.parse_args(argv)
  from bench_fast_samplers import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(args.config)
  rows = fidelity_rows(config, args.workdir, args.num_samples, args.batch_size)
  print(f"{args.num_samples} samples from the same x_T; RMSE in [-1, 1] pixels to the first teacher's samples")
  print("| sampler | network passes | RMSE to the first teacher |\n|---|---|---|")
  for name, passes, value in rows:
    print(f"| {name} | {passes} | {value:.4f} |")


if __name__ == "__main__":
  main()
