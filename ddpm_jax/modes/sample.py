"""--mode=sample: config.sampling.num_samples images of the EMA params, as .npz shards and a grid, in
workdir/samples/step_N<sampler tag>/ (evaluation/samples.py)."""
import os

import jax

from ddpm_jax import analytic_dpm
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import sampling
from ddpm_jax import trained_params
from ddpm_jax.evaluation import samples
from ddpm_jax.sampler import Sampler


def write_samples(config, model, params, step, sampler, out_dir):
  """The samples of (model, params) of checkpoint `step`, drawn by `sampler`, in out_dir; returns out_dir.

  The key is fold_in(seed, step): every sampler of one checkpoint starts from the same x_T per sample index.
  """
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  if sampler.method == analytic_dpm.METHOD:
    sampler = analytic_dpm.fit(sampler, sampling.unet_model_fn(model, params), diffusion,
                               input_pipeline.make_source(config.data),
                               num_examples=config.sampling.analytic_num_examples,
                               batch_size=config.sampling.batch_size, seed=config.seed)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  return samples.write_sample_shards(model, params, diffusion, sampler, rng, config.sampling.num_samples,
                                     config.sampling.batch_size, images.image_shape(config.data), out_dir)


def run(config, workdir):
  """Writes the samples; returns their directory."""
  sampler = Sampler.from_config(config.sampling, config.model.num_classes)
  samples.check_sizes(config.sampling.num_samples, config.sampling.batch_size)
  model, params, step = trained_params.load(config, workdir)
  tag = sampler.tag(config.diffusion.num_timesteps)
  return write_samples(config, model, params, step, sampler,
                       os.path.join(workdir, "samples", f"step_{step:08d}{tag}"))
