"""Training: the loop (`train_and_evaluate`) around train_step.py's pmapped step — data, checkpoints, preemption,
sample grids, FID monitoring and metric writers."""
import logging
import os

import flax
import jax
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import config_checks
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import fid_monitor
from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax.preemption import GracefulStop
from ddpm_jax import progress
from ddpm_jax import recorded_config
from ddpm_jax import sampling
from ddpm_jax import tensorflow_cpu
from ddpm_jax import train_step
from ddpm_jax.sampler import Sampler


def _every(step, n):
  # Not clu.periodic_actions: they raise unless called after every single step, and a dispatch runs k of them.
  return n > 0 and step % n == 0


def write_sample_grid(model, ema_params_replicated, diffusion, rng, config, step, workdir, writer):
  """Samples a grid from the EMA params on all local devices; host 0 writes workdir/samples/step_N.png.

  The paper's chain; a conditional model's grid has one column per class of config.sampling.labels, guided by its
  guidance_scale.
  """
  n = config.training.num_grid_samples
  n -= n % jax.local_device_count()
  conditioning = Sampler.from_config(config.sampling, config.model.num_classes)
  report = progress.Progress(f"Sample grid of step {step}", diffusion.num_timesteps, "chain steps")
  x = sampling.sample_sharded(model, ema_params_replicated, diffusion, rng, n, images.image_shape(config.data),
                              first_index=jax.process_index() * n, progress=report.update,
                              labels=conditioning.labels, guidance_scale=conditioning.guidance_scale)
  grid = images.make_grid(images.to_uint8(jax.device_get(x)), ncols=conditioning.grid_columns)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    images.save_png(path, grid, upscale=max(1, 512 // grid.shape[0]))
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Wrote %s", path)


def check_workdir_config(config, workdir):
  """Refuses to resume workdir with a config whose model, diffusion or data shape differ; records the config."""
  diff = recorded_config.resume_differences(config, workdir)
  if diff:
    raise ValueError(f"workdir {workdir} holds a run with a different config ({recorded_config.describe(diff)}); "
                     "use the same settings to resume it, or a new --workdir.")
  path = os.path.join(workdir, recorded_config.FILENAME)
  if jax.process_index() == 0:
    try:
      fileio.write_text(path, config.to_json_best_effort(indent=2))
    except OSError as e:  # checked before any training, so no work is lost
      raise ValueError(f"cannot write to workdir {workdir} ({e}); choose a writable --workdir.") from None


def _restore_or_init(config, model, tx, checkpointer, rng, init_params=None):
  """The state of the newest readable checkpoint in checkpointer, or else fresh params (init_params, if given: EMA
  equal to them and a fresh optimizer state)."""
  state = train_step.create_train_state(rng, model, tx, images.image_shape(config.data))
  if init_params is not None:
    state = state.replace(params=init_params, ema_params=init_params, opt_state=tx.init(init_params))
  restored = checkpointer.restore(checkpointing.abstract_like(state))
  return state if restored is None else restored[0]


def _open_writer(config, workdir, start_step):
  """clu's writers (events on host 0, logging elsewhere); a new run records the config's scalars as hparams."""
  tensorflow_cpu.load()  # before clu imports TensorFlow: see tensorflow_cpu.py
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in flax.traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                          if isinstance(v, (int, float, str, bool))})
  return writer


def _host_data(config, start_step):
  """(batches, slots): this host's batches from start_step on, and each local example's place in the global batch.

  slots is [local devices, per device]: host-major, then device, then row (the layout of the data).
  """
  global_batch, local_devices = config.training.batch_size, jax.local_device_count()
  per_device = global_batch // jax.device_count()
  first = jax.process_index() * local_devices * per_device
  slots = (first + np.arange(local_devices * per_device)).reshape(local_devices, per_device)
  batches = input_pipeline.batches(config.data, seed=config.seed, global_batch_size=global_batch,
                                   start_step=start_step, num_local_devices=local_devices,
                                   num_threads=config.data.num_threads, num_classes=config.model.num_classes)
  return batches, slots


def _save(checkpointer, step, state, config):
  # Host NumPy copies: Orbax cannot save the process-local device arrays that pmap leaves on a multi-host run.
  checkpointer.save(step, train_step.unreplicate(state),
                    dict(global_batch_size=config.training.batch_size, seed=config.seed, next_step=step))


def _host_summary(pending_metrics):
  """Mean (count, for nonfinite_steps) of the metrics of the steps since the last summary, as Python floats."""
  host = [jax.tree.map(float, train_step.unreplicate(m)) for m in pending_metrics]
  return {k: float((np.sum if k == "nonfinite_steps" else np.mean)([h[k] for h in host])) for k in host[0]}


class _Summaries:
  """The metrics of the steps since the last summary, and the non-finite-step policy applied when writing them.

  Not clu.metrics: it averages in float32 on the device and has no sum for the nonfinite_steps count.
  """

  def __init__(self, writer, checkpointer, skip_nonfinite_steps):
    self.writer, self.checkpointer, self.skip_nonfinite_steps = writer, checkpointer, skip_nonfinite_steps
    self.pending, self.nonfinite_total = [], 0

  def add(self, metrics):
    self.pending.append(metrics)

  def write(self, step):
    """Writes the summary of step; FloatingPointError if a step in it was not finite (unless they are skipped)."""
    summary = _host_summary(self.pending)
    self.pending = []
    self.nonfinite_total += int(summary["nonfinite_steps"])
    summary["nonfinite_steps_total"] = self.nonfinite_total
    self.writer.write_scalars(step, summary)
    if summary["nonfinite_steps"] and not self.skip_nonfinite_steps:
      raise FloatingPointError(
          f"non-finite loss or gradient in the {int(summary['nonfinite_steps'])} step(s) up to step {step} "
          f"(loss {summary['loss']}, grad_norm {summary['grad_norm']}); those steps were not applied and the "
          f"last checkpoint (step {self.checkpointer.latest_step()}) is intact. Lower optim.lr, check the data, or "
          "set training.skip_nonfinite_steps=True.")


class _SampleGridsAndFid:
  """The periodic evaluations of the EMA params, on every process: call it after each dispatch.

  A sample grid every training.sample_every_steps, the FID every training.fid_every_steps (a FidMonitor, made at
  construction so that missing Inception weights stop the run before it trains).
  """

  def __init__(self, config, workdir, model, diffusion, rng, writer):
    self.config, self.workdir, self.model, self.diffusion, self.rng, self.writer = (
        config, workdir, model, diffusion, rng, writer)
    fid_every = config.training.fid_every_steps
    self.fid = fid_monitor.FidMonitor(config, workdir, model, diffusion) if fid_every else None

  def __call__(self, step, ema_params_replicated):
    t_cfg = self.config.training
    if _every(step, t_cfg.sample_every_steps):
      write_sample_grid(self.model, ema_params_replicated, self.diffusion, jax.random.fold_in(self.rng, step),
                        self.config, step, self.workdir, self.writer)
    if self.fid and _every(step, t_cfg.fid_every_steps):
      self.fid(step, ema_params_replicated, self.writer)

  def wait(self):
    if self.fid:
      self.fid.wait()


def train_and_evaluate(config, workdir, *, init_params=None, objective=train_step.paper_loss, objective_args=None):
  """Trains config's model in workdir, resuming from the latest checkpoint there; returns the final state.

  SIGTERM/SIGINT: finish the current step, save, return. Non-finite loss or gradients: the step is skipped; the
  run stops with an error at the next summary unless training.skip_nonfinite_steps.

  The paper's training by default; a distillation round (modes/distill.py) starts from init_params instead of a
  random init and trains `objective` (train_step.train_step) with objective_args.
  """
  config_checks.validate(config, "train", jax.device_count())  # before anything is compiled or written
  model = train_step.create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, _ = train_step.create_optimizer(config.optim)
  # A bad data set (or labels that do not fit model.num_classes) fails here, before anything is compiled or written.
  input_pipeline.make_source(config.data, config.model.num_classes)
  check_workdir_config(config, workdir)
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  t_cfg, k = config.training, config.training.steps_per_dispatch
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t_cfg.keep_checkpoints) as ckpt:
    state = _restore_or_init(config, model, tx, ckpt, init_rng, init_params)
    step = int(state.step)
    logging.info("Starting at step %d of %d.", step, t_cfg.num_train_steps)
    writer = _open_writer(config, workdir, step)
    p_train_steps = train_step.pmapped_train_steps(model, tuple(sorted(config.optim.items())), objective)
    extra = () if objective is train_step.paper_loss else (objective_args,)
    batches, slots = _host_data(config, step)
    state = flax.jax_utils.replicate(state)
    evaluations = _SampleGridsAndFid(config, workdir, model, diffusion, sample_rng, writer)
    summaries = _Summaries(writer, ckpt, t_cfg.skip_nonfinite_steps)
    # Imported after _open_writer: clu imports TensorFlow, which tensorflow_cpu.load() must import first.
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    report = periodic_actions.ReportProgress(num_train_steps=t_cfg.num_train_steps, writer=writer)
    run_steps = None
    with GracefulStop() as stop:
      while step < t_cfg.num_train_steps:
        # [devices, k, b, H, W, C] (and labels [devices, k, b])
        chunk = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *[next(batches) for _ in range(k)])
        if run_steps is None:
          run_steps = train_step.compiled_train_steps(p_train_steps, state, chunk, slots, diffusion, train_rng, *extra)
        state, metrics = run_steps(state, chunk, slots, diffusion, train_rng, *extra)
        ckpt.raise_if_save_failed()  # a broken disk stops the run now, not at the next save
        step += k
        summaries.add(metrics)
        report(step)
        last = step == t_cfg.num_train_steps
        stopping = stop.requested or ckpt.reached_preemption(step)
        saving = _every(step, t_cfg.checkpoint_every_steps) or last or stopping
        if _every(step, t_cfg.log_every_steps) or saving:
          summaries.write(step)
        evaluations(step, state.ema_params)
        if saving:
          _save(ckpt, step, state, config)
        if stopping and not last:
          logging.warning("Stopped at step %d on request; checkpoint saved. Rerun the same command to resume.", step)
          break
    ckpt.wait()
  evaluations.wait()
  writer.flush()
  return train_step.unreplicate(state)
