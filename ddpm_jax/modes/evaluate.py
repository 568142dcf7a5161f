"""--mode=eval: the paper's Table 1 numbers (FID, IS, bits/dim) and figures for the EMA params of one checkpoint.

Every stage resumes: sample shards and bits/dim shards already on disk are skipped and the reference statistics are
cached, so a rerun after preemption redoes at most one batch. Files, in workdir/eval/: samples_step_N/,
bpd_step_N_<split>/, ref_stats_<name>_<split>.npz, figures/, results_step_N.json. With several hosts the workdir
must be a filesystem they share (as for checkpoints): each host writes its own sample shards and the Inception
features of its share of them, and process 0 reads them all after a barrier and writes the results.
"""
import copy
import functools
import json
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import fileio
from ddpm_jax import input_pipeline
from ddpm_jax import sampling
from ddpm_jax import tensorflow_cpu
from ddpm_jax import trained_params
from ddpm_jax.evaluation import bpd
from ddpm_jax.evaluation import digits_quality
from ddpm_jax.evaluation import figures
from ddpm_jax.evaluation import inception
from ddpm_jax.evaluation import inception_weights
from ddpm_jax.evaluation import reference_stats
from ddpm_jax.evaluation import sample_quality
from ddpm_jax.evaluation import samples
from ddpm_jax.modes import sample as sample_mode
from ddpm_jax.sampler import Sampler


def _barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@functools.cache
def inception_features(weights):
  """Inception's uint8 batch → {'pool_3', 'logits' if the weights have the head}; loaded once per weights file."""
  return inception.make_feature_fn(inception_weights.load_inception_params(weights))


def fid_reference(config, workdir, feature_fn):
  """(mu, sigma, description) of FID's reference: eval.ref_stats, or config.data's statistics cached in eval/."""
  return reference_stats.reference_stats(config.data, feature_fn, os.path.join(workdir, "eval"),
                                         batch_size=config.eval.inception_batch_size,
                                         stats_file=config.eval.ref_stats)


def eval_examples(data, split):
  """(random-access source, description) of the examples bits/dim and the figures are measured on."""
  data = copy.deepcopy(data)
  if data.source == "tfds":
    data.split = split
    return input_pipeline.make_source(data), f"tfds {data.name} split {split}"
  return input_pipeline.make_source(data), (f"{data.source} {reference_stats.data_name(data)} (no splits: its "
                                            "training examples)")


def run(config, workdir):
  """Loads the EMA params of config.sampling.checkpoint once and evaluates them (`evaluate_params`)."""
  ev = config.eval
  # Found before hours of sampling: a missing Inception file is a one-line error now, not after the samples.
  weights = (ev.inception_weights or inception_weights.default_weights_path()) if ev.num_samples > 0 else None
  model, params, step = trained_params.load(config, workdir)
  return evaluate_params(config, workdir, model, params, step, weights)


def evaluate_params(config, workdir, model, params, step, weights):
  """FID (and IS) of eval.num_samples samples and bits/dim of eval.bpd_num_examples; returns the results dict.

  The results also go to workdir/eval/results_step_N<sampler tag>.json (process 0): per metric its value and what
  it was measured on, with the checkpoint step and weights ('ema'). weights: the Inception file (None: no FID).
  """
  ev, T = config.eval, config.diffusion.num_timesteps
  sampler = Sampler.from_config(config.sampling, config.model.num_classes)
  eval_dir = os.path.join(workdir, "eval")
  results = dict(checkpoint_step=step, weights="ema", sampler=sampler.chain_kwargs())
  logging.info("Evaluating the EMA params of step %d in %s", step, workdir)

  if ev.num_samples > 0:
    sample_config = copy.deepcopy(config)
    sample_config.sampling.num_samples = ev.num_samples
    sample_dir = sample_mode.write_samples(sample_config, model, params, step, sampler,
                                           os.path.join(eval_dir, f"samples_step_{step:08d}{sampler.tag(T)}"))

  num_bpd = ev.bpd_num_examples
  if num_bpd != 0:
    diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
    source, bpd_data = eval_examples(config.data, ev.bpd_split)
    num_bpd = len(source) if num_bpd < 0 else min(num_bpd, len(source))
    bpd_dir = os.path.join(eval_dir, f"bpd_step_{step:08d}_{ev.bpd_split}")
    rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), step))[1]  # not sampling's stream
    bpd.write_bpd_shards(model, params, diffusion, source, num_bpd, ev.bpd_batch_size, rng, bpd_dir)

  if ev.num_samples > 0:
    feature_fn = inception_features(weights)
    _barrier("eval: samples written")
    # Keyed by the weights file: features of another Inception (e.g. one with the IS head) are never mixed in.
    feature_dir = os.path.join(sample_dir, "inception_" + os.path.splitext(os.path.basename(weights))[0])
    sample_quality.write_feature_shards(sample_dir, feature_fn, ev.inception_batch_size, feature_dir)

  _barrier("eval: shards written")
  results_path = os.path.join(eval_dir, f"results_step_{step:08d}{sampler.tag(T)}.json")
  if jax.process_index() == 0:
    if ev.num_samples > 0:
      ref_mu, ref_sigma, ref_description = fid_reference(config, workdir, feature_fn)
      fid_row, is_row = sample_quality.sample_metrics(
          sample_quality.read_feature_shards(sample_dir, feature_dir, ev.num_samples), ev.num_samples, ref_mu,
          ref_sigma)
      results["fid"] = dict(fid_row, reference=ref_description, inception_weights=weights, samples=sample_dir)
      results["inception_score"] = dict(is_row, inception_weights=weights)
      if config.data.source == "digits":  # the offline demo: how near the floor, and are the samples readable?
        results["digits"] = digits_quality.demo_report(
            samples.load_samples(sample_dir)[:ev.num_samples], fid_row["value"], feature_fn,
            ev.inception_batch_size, ref_mu, ref_sigma, seed=config.seed,
            labels=samples.load_labels(sample_dir)[:ev.num_samples] if sampler.labels else None)
        logging.info("The digits demo against its goals:\n%s",
                     "\n".join(digits_quality.report_lines(results["digits"])))
    if num_bpd != 0:
      results["bpd"] = dict(bpd.summarize_bpd(bpd.read_bpd_shards(bpd_dir, num_bpd, ev.bpd_batch_size)),
                            data=bpd_data, timesteps=T)
    if ev.figures:
      results["figures"] = _write_figures(config, model, params, step, os.path.join(eval_dir, "figures"))
    fileio.write_text(results_path, json.dumps(results, indent=2))
    logging.info("Results in %s: %s", results_path, json.dumps(results))
  _barrier("eval: results written")
  if jax.process_index() != 0:
    results = json.loads(fileio.read_text(results_path))
  return results


def _write_figures(config, model, params, step, out_dir):
  """The paper's figures (evaluation/figures.py) under out_dir and in TensorBoard; returns their paths."""
  source, _ = eval_examples(config.data, config.eval.bpd_split)
  data = np.stack([source[i] for i in range(min(max(config.eval.figures_num_examples, 2), len(source)))])
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  tensorflow_cpu.load()  # clu's writer is TensorFlow's (imported here: a sweep, which uses this module, needs none)
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(os.path.join(os.path.dirname(out_dir), "tensorboard"))
  paths = figures.write_figures(sampling.unet_model_fn(model, params), diffusion, rng, data, out_dir, step, writer)
  writer.flush()
  return paths
