"""The train step: TrainState with EMA, the optimizer, one DDPM step, and k of them pmapped over the devices.

Pure functions of JAX, Flax and Optax alone. The training loop (train.py) adds data, checkpoints and TensorFlow-backed
writers; a process that only needs the step (a notebook, your own loop, benchmarks/bench_memory.py) imports this
module and never TensorFlow, which is 0.5 GB of resident memory on CPU.
"""
import collections
import ctypes
import functools
import logging
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax.models import unet


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # completed train steps; the next step trains on the data batch of this index
  params: Any
  ema_params: Any
  opt_state: Any


def create_model(config):
  """The U-Net of config.model, with out_ch from the data channels (×2 for a learned variance).

  config.model must hold every field of configs/cifar10.py's model group, dtype (of the activations) and remat
  included.
  """
  learned = config.diffusion.model_var_type in ("learned", "learned_range")
  kwargs = dict(config.model)
  kwargs["dtype"] = jnp.dtype(config.model.dtype)
  kwargs["ch_mult"], kwargs["attn_resolutions"] = tuple(kwargs["ch_mult"]), tuple(kwargs["attn_resolutions"])
  return unet.UNet(out_ch=config.data.channels * (2 if learned else 1), **kwargs)


def create_optimizer(optim_config):
  """Clip to a global norm, then Adam with a linear warmup from 0 (the authors' setup); with optim.lr_anneal_steps
  = n > 0 the lr then falls linearly to 0 at step n (the distillation rounds of Salimans & Ho)."""
  warmup, anneal, lr = optim_config.warmup_steps, optim_config.lr_anneal_steps, optim_config.lr
  # optax's linear_schedule with 0 transition steps would stay at its start forever: each piece only if it has steps.
  after = optax.linear_schedule(lr, 0.0, anneal - warmup) if anneal > 0 else optax.constant_schedule(lr)
  schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup]) if warmup > 0 else after
  tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip),
                   optax.adam(schedule, b1=optim_config.beta1, b2=optim_config.beta2, eps=optim_config.eps))
  return tx, schedule


def create_train_state(rng, model, tx, image_shape):
  """Fresh params (EMA starts equal to them) and optimizer state; image_shape is (H, W, C)."""
  # One compiled program: run eagerly, the optimizer's init compiles a small program per parameter shape.
  def init(r):
    params = model.init(r, jnp.zeros((1,) + tuple(image_shape)), jnp.zeros((1,), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))
  return jax.jit(init)(rng)


def split_batch(batch):
  """(images, labels or None) of a training batch: an image array, or (images, labels) for a conditional model."""
  return batch if isinstance(batch, tuple) else (batch, None)


def dropped_labels(model, labels, example_keys):
  """The labels a conditional model trains on: each replaced by the null label with probability model.class_dropout,
  a coin per example from its key (so, like t and ε, independent of how the batch is split over devices)."""
  if labels is None or not model.class_dropout:
    return labels
  drop = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)) < model.class_dropout)(example_keys)
  return jnp.where(drop, model.null_label, labels)


def paper_loss(model, params, batch, example_keys, dropout_rng, diffusion, objective_args=None):
  """The batch's mean loss of the paper (diffusion.training_losses: L_simple, or the configured KL/hybrid): t and ε
  of each example drawn from its key. train_step's default objective; objective_args is unused.

  A conditional model's batch is (images, labels); its labels are dropped to null as model.class_dropout says.
  """
  del objective_args
  images, labels = split_batch(batch)
  labels = dropped_labels(model, labels, example_keys)
  t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, diffusion.num_timesteps))(example_keys)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), images.shape[1:], images.dtype))(example_keys)
  model_fn = lambda x_t, tt: model.apply({"params": params}, x_t, tt, train=True, labels=labels,
                                         rngs={"dropout": dropout_rng})
  losses, _ = diffusion.training_losses(model_fn, images, t, noise)
  return jnp.mean(losses)


def train_step(state, batch, slots, *, model, diffusion, tx, schedule, ema_decay, rng, objective=paper_loss,
               objective_args=None):
  """One step on this device's batch [b, H, W, C] (or (images, labels [b])); `slots` [b] are the examples' positions
  in the global batch.

  Each example's randomness (t and ε for the paper's loss) comes from a key folded from (rng, step, slot), so it
  does not depend on how the global batch is split over devices and hosts; dropout masks use the device's first
  slot. Gradients and metrics are averaged over the 'batch' axis (all devices of all hosts).

  objective(model, params, batch, example_keys, dropout_rng, diffusion, objective_args) → the batch's mean loss:
  the paper's by default, or another trained the same way (distillation.RoundLoss, its teacher in objective_args).
  """
  example_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  example_keys = jax.vmap(lambda s: jax.random.fold_in(example_rng, s))(slots)
  dropout_rng = jax.random.fold_in(dropout_rng, slots[0])
  loss_fn = lambda params: objective(model, params, batch, example_keys, dropout_rng, diffusion, objective_args)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads = jax.lax.pmean(grads, axis_name="batch")
  loss = jax.lax.pmean(loss, axis_name="batch")
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # ema_decay·ema + (1 − ema_decay)·params; this argument order fuses as the old hand-written line did: bit-equal.
  ema_params = optax.incremental_update(state.ema_params, params, ema_decay)
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
  """k train steps in one call (batches [k, b, H, W, C], or a tuple with labels [k, b]); metrics averaged over the k
  steps.

  The k steps are unrolled at trace time rather than put in a `lax.scan`: on XLA:CPU a while loop around the
  backward convolutions ran 16× slower (8.2 s vs 0.5 s per step, digits config; docs/performance.md).
  """
  all_metrics = []
  for i in range(jax.tree.leaves(batches)[0].shape[0]):
    state, metrics = train_step(state, jax.tree.map(lambda b, i=i: b[i], batches), slots, **kwargs)
    all_metrics.append(metrics)
  summed = {"nonfinite_steps"}  # counted, the rest averaged
  return state, {k: (jnp.sum if k in summed else jnp.mean)(jnp.stack([m[k] for m in all_metrics]))
                 for k in all_metrics[0]}


@functools.lru_cache(maxsize=4)
def pmapped_train_steps(model, optim_items, objective=paper_loss):
  """train_steps pmapped over all devices, state donated: fn(state, batches, slots, diffusion, rng), and with an
  objective other than the paper's, fn(state, batches, slots, diffusion, rng, objective_args).

  Cached on (model, optimizer settings, objective) so that another run in the same process (a notebook, the tests)
  reuses the compiled step; the diffusion, rng and objective_args are arguments, not constants, for the same reason.
  """
  optim_config = dict(optim_items)
  tx, schedule = create_optimizer(ml_collections.ConfigDict(optim_config))
  def fn(state, batches, slots, diffusion, rng, objective_args=None):
    return train_steps(state, batches, slots, model=model, diffusion=diffusion, tx=tx, schedule=schedule,
                       ema_decay=optim_config["ema_decay"], rng=rng, objective=objective,
                       objective_args=objective_args)
  if objective is paper_loss:
    paper = lambda state, batches, slots, diffusion, rng: fn(state, batches, slots, diffusion, rng)
    return jax.pmap(paper, axis_name="batch", in_axes=(0, 0, 0, None, None), donate_argnums=(0,))
  return jax.pmap(fn, axis_name="batch", in_axes=(0, 0, 0, None, None, None), donate_argnums=(0,))


_COMPILED = collections.OrderedDict()  # (pmapped fn, argument shapes and devices) → executable; the newest few
_COMPILED_KEEP = 4


def compiled_train_steps(p_train_steps, *args, compiler_options=None):
  """p_train_steps (from pmapped_train_steps) compiled ahead of time for the shapes of args; call it with args.
  compiler_options: XLA options for this compile only (the benchmarks time variants side by side with them).

  Compiling before the first step lets the loop log the compile time and the memory XLA planned for the step, and
  hand what the compiler freed back to the OS before the step allocates its buffers: glibc keeps it otherwise,
  ≈ 0.8 GB of host memory for the CIFAR-10 step on CPU (docs/performance.md). Cached per argument shapes, so a second
  run in the same process compiles nothing. On a multi-host run it returns p_train_steps itself, which compiles on
  its first call: there pmap's ahead-of-time executables expect the global device axis, not this host's arrays.
  """
  if jax.process_count() > 1:
    return p_train_steps
  leaves, treedef = jax.tree.flatten(args)
  key = (p_train_steps, treedef, tuple(sorted((compiler_options or {}).items())),
         tuple((np.shape(x), np.result_type(x), getattr(x, "sharding", None)) for x in leaves))
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
  t0 = time.perf_counter()
  compiled = p_train_steps.lower(*args).compile(compiler_options=compiler_options)
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info("Compiled the train step in %.1f s; per device XLA plans %.2f GiB of temporary buffers beside "
                 "%.2f GiB of arguments.", time.perf_counter() - t0, memory.temp_size_in_bytes / 2**30,
                 memory.argument_size_in_bytes / 2**30)
  release_freed_memory()
  _COMPILED[key] = compiled
  while len(_COMPILED) > _COMPILED_KEEP:
    _COMPILED.popitem(last=False)
  return compiled


def release_freed_memory():
  """Returns the heap memory freed so far to the OS (glibc's malloc_trim); nothing happens without glibc."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators have no such call
    pass


def unreplicate(tree):
  """This host's copy of a pmap-replicated pytree, as NumPy arrays (works on multi-host pods, where x[0] may not be
  addressable). A copy on the host: every caller wants it there; slicing each leaf on the device would compile a
  program per leaf shape; and a zero-copy view of a CPU buffer would change under an asynchronous checkpoint save
  once the next step reuses the donated state."""
  return jax.tree.map(lambda x: np.array(x.addressable_shards[0].data)[0], tree)
