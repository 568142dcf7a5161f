"""Training: the TrainState with EMA, the pmapped train step, and the loop (`train_and_evaluate`)."""
import functools
import json
import logging
import os
from typing import Any

from clu import metric_writers
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import checkpointing
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import fid_monitor
from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax.preemption import GracefulStop
from ddpm_jax import sampling
from ddpm_jax.models import unet


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # completed train steps; the next step trains on the data batch of this index
  params: Any
  ema_params: Any
  opt_state: Any


def create_model(config):
  """The U-Net of config.model, with out_ch from the data channels (×2 for a learned variance).

  model.dtype (activations; default 'float32') and model.remat (default False) may be absent: older configs and
  run directories lack them.
  """
  learned = config.diffusion.model_var_type in ("learned", "learned_range")
  kwargs = dict(config.model)
  kwargs["dtype"] = jnp.dtype(config.model.get("dtype", "float32"))
  kwargs["remat"] = bool(config.model.get("remat", False))
  kwargs["ch_mult"], kwargs["attn_resolutions"] = tuple(kwargs["ch_mult"]), tuple(kwargs["attn_resolutions"])
  return unet.UNet(out_ch=config.data.channels * (2 if learned else 1), **kwargs)


def create_optimizer(optim_config):
  """Clip to a global norm, then Adam with a linear warmup from 0 (the authors' setup)."""
  warmup = optim_config.warmup_steps
  # optax's linear_schedule with 0 transition steps would stay at 0 forever: no warmup means a constant lr.
  schedule = optax.linear_schedule(0.0, optim_config.lr, warmup) if warmup > 0 else optax.constant_schedule(
      optim_config.lr)
  tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip),
                   optax.adam(schedule, b1=optim_config.beta1, b2=optim_config.beta2, eps=optim_config.eps))
  return tx, schedule


def create_train_state(rng, model, tx, image_shape):
  """Fresh params (EMA starts equal to them) and optimizer state; image_shape is (H, W, C)."""
  init = jax.jit(lambda r: model.init(r, jnp.zeros((1,) + tuple(image_shape)), jnp.zeros((1,), jnp.int32)))
  params = init(rng)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))


def train_step(state, batch, slots, *, model, diffusion, tx, schedule, ema_decay, rng):
  """One step on this device's batch [b, H, W, C]; `slots` [b] are the examples' positions in the global batch.

  t and ε of an example are drawn from a key folded from (rng, step, slot), so they do not depend on how the global
  batch is split over devices and hosts; dropout masks use the device's first slot. Gradients and metrics are
  averaged over the 'batch' axis (all devices of all hosts).
  """
  example_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  example_keys = jax.vmap(lambda s: jax.random.fold_in(example_rng, s))(slots)
  t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, diffusion.num_timesteps))(example_keys)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), batch.shape[1:], batch.dtype))(example_keys)
  dropout_rng = jax.random.fold_in(dropout_rng, slots[0])

  def loss_fn(params):
    model_fn = lambda x_t, tt: model.apply({"params": params}, x_t, tt, train=True, rngs={"dropout": dropout_rng})
    losses, _ = diffusion.training_losses(model_fn, batch, t, noise)
    return jnp.mean(losses)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads = jax.lax.pmean(grads, axis_name="batch")
  loss = jax.lax.pmean(loss, axis_name="batch")
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
  # A non-finite loss or gradient leaves params, EMA and Adam moments untouched (the step still counts), so
  # a NaN never reaches a checkpoint; the loop then stops or carries on, as configured.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         ema_params=keep(ema_params, state.ema_params), opt_state=keep(opt_state, state.opt_state))
  metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
                 lr=schedule(state.step), nonfinite_steps=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def train_steps(state, batches, slots, **kwargs):
  """k train steps in one call (batches [k, b, H, W, C]); metrics averaged over the k steps.

  The k steps are unrolled at trace time rather than put in a `lax.scan`: on XLA:CPU a while loop around the
  backward convolutions ran 16× slower (8.2 s vs 0.5 s per step, digits config; docs/performance.md).
  """
  all_metrics = []
  for i in range(batches.shape[0]):
    state, metrics = train_step(state, batches[i], slots, **kwargs)
    all_metrics.append(metrics)
  summed = {"nonfinite_steps"}  # counted, the rest averaged
  return state, {k: (jnp.sum if k in summed else jnp.mean)(jnp.stack([m[k] for m in all_metrics]))
                 for k in all_metrics[0]}


@functools.lru_cache(maxsize=4)
def pmapped_train_steps(model, optim_items):
  """train_steps pmapped over all devices, state donated: fn(state, batches, slots, diffusion, rng).

  Cached on (model, optimizer settings) so that another run in the same process (a notebook, the tests) reuses
  the compiled step; the diffusion and rng are arguments, not constants, for the same reason.
  """
  optim_config = dict(optim_items)
  tx, schedule = create_optimizer(ml_collections.ConfigDict(optim_config))
  def fn(state, batches, slots, diffusion, rng):
    return train_steps(state, batches, slots, model=model, diffusion=diffusion, tx=tx, schedule=schedule,
                       ema_decay=optim_config["ema_decay"], rng=rng)
  return jax.pmap(fn, axis_name="batch", in_axes=(0, 0, 0, None, None), donate_argnums=(0,))


def unreplicate(tree):
  """This host's copy of a pmap-replicated pytree (works on multi-host pods, where x[0] may not be addressable)."""
  return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def validate_config(config, model):
  """One-line errors for settings that cannot run, raised before anything is compiled or written."""
  devices = jax.device_count()
  t = config.training
  if t.batch_size % devices:
    raise ValueError(f"training.batch_size {t.batch_size} is not divisible by the {devices} devices; "
                     f"use a multiple of {devices}.")
  model.check_image_size(config.data.image_size)
  k = t.steps_per_dispatch
  if k < 1:
    raise ValueError(f"training.steps_per_dispatch must be >= 1, got {k}.")
  for name in ("log_every_steps", "checkpoint_every_steps", "sample_every_steps", "fid_every_steps"):
    every = t.get(name, 0)
    if every < 0 or (every and every % k):
      raise ValueError(f"training.{name} = {every} must be >= 0 and a multiple of training.steps_per_dispatch {k}.")
  if t.num_train_steps % k:
    raise ValueError(f"training.num_train_steps {t.num_train_steps} must be a multiple of "
                     f"training.steps_per_dispatch {k}.")


def _every(step, n):
  return n > 0 and step % n == 0


def write_sample_grid(model, ema_params_replicated, diffusion, rng, config, step, workdir, writer):
  """Samples a grid from the EMA params on all local devices; host 0 writes workdir/samples/step_N.png."""
  n = config.training.num_grid_samples
  n -= n % jax.local_device_count()
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  x = sampling.sample_sharded(model, ema_params_replicated, diffusion, rng, n, shape,
                              first_index=jax.process_index() * n)
  grid = images.make_grid(images.to_uint8(jax.device_get(x)))
  if jax.process_index() == 0:
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    images.save_png(path, grid, upscale=max(1, 512 // grid.shape[0]))
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Wrote %s", path)


# Fields that fix the shapes and meaning of a checkpoint: a restart must not change them.
_FIXED_FIELDS = ("model", "diffusion", "data.image_size", "data.channels", "training.batch_size")
# …except these, which change how the same params are computed, not what they are: a resumed run may switch them.
_FREE_FIELDS = ("model.dtype", "model.remat")


def check_workdir_config(config, workdir):
  """Refuses to resume workdir with a config whose model, diffusion or data shape differ; records the config."""
  path = os.path.join(workdir, "config.json")
  new = flax.traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  if fileio.exists(path):
    old = flax.traverse_util.flatten_dict(json.loads(fileio.read_text(path)), sep=".")
    fixed = lambda k: any(k == f or k.startswith(f + ".") for f in _FIXED_FIELDS) and k not in _FREE_FIELDS
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if fixed(k) and old.get(k) != new.get(k)]
    if diff:
      raise ValueError(f"workdir {workdir} holds a run with a different config ({'; '.join(diff)}); use the same "
                       "settings to resume it, or a new --workdir.")
  if jax.process_index() == 0:
    try:
      fileio.write_text(path, config.to_json_best_effort(indent=2))
    except OSError as e:  # checked before any training, so no work is lost
      raise ValueError(f"cannot write to workdir {workdir} ({e}); choose a writable --workdir.") from None


def _host_summary(pending_metrics):
  """Mean (count, for nonfinite_steps) of the metrics of the steps since the last summary, as Python floats."""
  host = [jax.tree.map(lambda x: float(x.addressable_shards[0].data[0]), m) for m in pending_metrics]
  return {k: float((np.sum if k == "nonfinite_steps" else np.mean)([h[k] for h in host])) for k in host[0]}


def train_and_evaluate(config, workdir):
  """Trains config's model in workdir, resuming from the latest checkpoint there; returns the final state.

  SIGTERM/SIGINT: finish the current step, save, return. Non-finite loss or gradients: the step is skipped; the
  run stops with an error at the next summary unless training.skip_nonfinite_steps.
  """
  model = create_model(config)
  validate_config(config, model)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, _ = create_optimizer(config.optim)
  input_pipeline.make_source(config.data)  # a bad data set fails here, before anything is compiled or written
  check_workdir_config(config, workdir)
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  global_batch, t_cfg = config.training.batch_size, config.training

  state = create_train_state(init_rng, model, tx, image_shape)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t_cfg.keep_checkpoints)
  restored = checkpointer.restore(checkpointing.abstract_like(state))
  if restored is not None:
    state, _ = restored
  start_step = int(state.step)
  logging.info("Starting at step %d of %d.", start_step, t_cfg.num_train_steps)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in flax.traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                          if isinstance(v, (int, float, str, bool))})

  k, local_devices = t_cfg.steps_per_dispatch, jax.local_device_count()
  per_device = global_batch // jax.device_count()
  # Position of each local example in the global batch: host-major, then device, then row (the data layout).
  slots = (jax.process_index() * local_devices * per_device + np.arange(local_devices * per_device)).reshape(
      local_devices, per_device)
  p_train_steps = pmapped_train_steps(model, tuple(sorted(config.optim.items())))
  batches = input_pipeline.batches(config.data, seed=config.seed, global_batch_size=global_batch,
                                   start_step=start_step, num_local_devices=local_devices)
  state = flax.jax_utils.replicate(state)

  def save(step):
    # Host NumPy copies: Orbax cannot save the process-local device arrays that pmap leaves on a multi-host run.
    checkpointer.save(step, jax.device_get(unreplicate(state)),
                      dict(global_batch_size=global_batch, seed=config.seed, next_step=step))

  fid_every = t_cfg.get("fid_every_steps", 0)
  monitor = fid_monitor.FidMonitor(config, workdir, model, diffusion) if fid_every else None
  report = periodic_actions.ReportProgress(num_train_steps=t_cfg.num_train_steps, writer=writer)
  pending_metrics, step, skipped_total = [], start_step, 0
  with GracefulStop() as stop:
    while step < t_cfg.num_train_steps:
      chunk = np.stack([next(batches) for _ in range(k)], axis=1)  # [devices, k, b, H, W, C]
      state, metrics = p_train_steps(state, chunk, slots, diffusion, train_rng)
      step += k
      pending_metrics.append(metrics)
      report(step)
      last = step == t_cfg.num_train_steps
      stopping = stop.requested or checkpointer.reached_preemption(step)
      saving = _every(step, t_cfg.checkpoint_every_steps) or last or stopping
      if _every(step, t_cfg.log_every_steps) or saving:
        summary = _host_summary(pending_metrics)
        pending_metrics = []
        skipped_total += int(summary["nonfinite_steps"])
        summary["nonfinite_steps_total"] = skipped_total
        writer.write_scalars(step, summary)
        if summary["nonfinite_steps"] and not t_cfg.skip_nonfinite_steps:
          raise FloatingPointError(
              f"non-finite loss or gradient in the {int(summary['nonfinite_steps'])} step(s) up to step {step} "
              f"(loss {summary['loss']}, grad_norm {summary['grad_norm']}); those steps were not applied and the "
              f"last checkpoint (step {checkpointer.latest_step()}) is intact. Lower optim.lr, check the data, or "
              "set training.skip_nonfinite_steps=True.")
      if _every(step, t_cfg.sample_every_steps):
        write_sample_grid(model, state.ema_params, diffusion, jax.random.fold_in(sample_rng, step), config, step,
                          workdir, writer)
      if monitor and _every(step, fid_every):
        monitor(step, state.ema_params, writer)
      if saving:
        save(step)
      if stopping and not last:
        logging.warning("Stopped at step %d on request; checkpoint saved. Rerun the same command to resume.", step)
        break
  checkpointer.wait()
  if monitor:
    monitor.wait()
  writer.flush()
  return unreplicate(state)
