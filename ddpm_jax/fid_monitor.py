"""FID during training: every training.fid_every_steps, the FID of K EMA samples; the best step's EMA params kept.

The paper reports its best checkpoint by FID. The best EMA params live in workdir/best_fid/<step>/ (an Orbax
CheckpointManager keeping one: the new best is complete on disk before the old one is removed), with its FID and
step; `--mode=sample|eval --config.sampling.checkpoint=best_fid` uses them. A resumed run reads the best FID back, so
"best" spans restarts. Sampling uses the eval sampler fields (training.fid_num_steps may respace the chain for
speed) and its own key stream, so it never changes the training trajectory.
"""
import dataclasses
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax import devices
from ddpm_jax import images
from ddpm_jax import paths
from ddpm_jax import progress
from ddpm_jax import sampling
from ddpm_jax import train_step
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import inception
from ddpm_jax.evaluation import inception_weights
from ddpm_jax.evaluation import reference_stats
from ddpm_jax.sampler import Sampler

BEST_DIR = "best_fid"


def best_manager(workdir, create=True):
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
  return ocp.CheckpointManager(paths.absolute(os.path.join(workdir, BEST_DIR)), options=options,
                               item_names=("params", "info"))


def restore_best(workdir, abstract_params):
  """(EMA params, info {fid, step}) of the best-FID checkpoint; one-line error if the run kept none."""
  path = os.path.join(workdir, BEST_DIR)
  manager = best_manager(workdir, create=False) if os.path.isdir(path) else None
  step = manager.latest_step() if manager else None
  if step is None:
    raise FileNotFoundError(f"no best-FID checkpoint in {path}; train with training.fid_every_steps > 0, or sample "
                            "the latest checkpoint (sampling.checkpoint=latest).")
  restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                                           info=ocp.args.JsonRestore()))
  return restored["params"], restored["info"]


class FidMonitor:
  """Call it with (step, replicated EMA params, writer) on every process; returns the FID."""

  def __init__(self, config, workdir, model, diffusion):
    t = config.training
    self.num_samples = t.fid_num_samples
    # The labels and guidance of config.sampling (a conditional model), with the monitor's own chain.
    self.sampler = dataclasses.replace(
        Sampler.from_config(config.sampling, config.model.num_classes),
        method=t.get("fid_method", "ddim") if t.fid_num_steps else "ancestral", num_steps=t.fid_num_steps, eta=0.0,
        order=2, spacing="auto")
    devices.check_divisible("training.fid_num_samples", self.num_samples, jax.device_count())
    # Found now, not at the first measurement: a missing Inception file stops the run before it trains.
    self.weights = config.eval.inception_weights or inception_weights.default_weights_path()
    self.config, self.workdir, self.model, self.diffusion = config, workdir, model, diffusion
    self._feature_fn, self._ref = None, None
    self.manager = best_manager(workdir)
    best = self.manager.latest_step()
    self.best_fid = (self.manager.restore(best, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]["fid"]
                     if best is not None else float("inf"))
    self.rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xF1D)  # a stream of its own

  def feature_fn(self):
    """Inception's batch → {'pool_3': …} (evaluation/inception.py), loaded at the first measurement."""
    if self._feature_fn is None:
      self._feature_fn = inception.make_feature_fn(inception_weights.load_inception_params(self.weights))
    return self._feature_fn

  def reference(self):
    if self._ref is None:
      mu, sigma, _ = reference_stats.reference_stats(
          self.config.data, self.feature_fn(), os.path.join(self.workdir, "eval"),
          batch_size=self.config.eval.inception_batch_size, stats_file=self.config.eval.ref_stats)
      self._ref = mu, sigma
    return self._ref

  def __call__(self, step, ema_params_replicated, writer):
    per_host = self.num_samples // jax.process_count()
    report = progress.Progress(f"FID samples of step {step}", self.sampler.steps(self.diffusion.num_timesteps),
                               "chain steps")
    x = sampling.sample_sharded(self.model, ema_params_replicated, self.diffusion, jax.random.fold_in(self.rng, step),
                                per_host, images.image_shape(self.config.data),
                                first_index=jax.process_index() * per_host, progress=report.update,
                                **self.sampler.chain_kwargs())
    features = fid.compute_features(self.feature_fn(), images.to_uint8(jax.device_get(x)),
                                    min(100, per_host))["pool_3"]
    if jax.process_count() > 1:  # every host gets all features, so all agree on the FID and on saving
      features = np.asarray(multihost_utils.process_allgather(features)).reshape(-1, features.shape[-1])
    value = fid.fid_from_features(features, *self.reference())
    writer.write_scalars(step, {"fid": value})
    logging.info("Step %d: FID %.3f of %d EMA samples (best so far %.3f)", step, value, self.num_samples,
                 self.best_fid)
    if value < self.best_fid:
      self.best_fid = value
      params = train_step.unreplicate(ema_params_replicated)
      self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                      info=ocp.args.JsonSave(dict(fid=value, step=step))))
    return value

  def wait(self):
    self.manager.wait_until_finished()
