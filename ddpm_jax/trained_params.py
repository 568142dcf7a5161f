"""The EMA params a sampling or evaluation run uses, loaded once per run: the latest checkpoint, the best-FID one,
or converted release weights.

Every driver (--mode=sample, eval, sweep) loads them here and hands them to the evaluation library, so one run
measures one set of params even if a training run writes a new checkpoint meanwhile.
"""
import logging
import os

import jax

from ddpm_jax import checkpointing
from ddpm_jax import convert
from ddpm_jax import fid_monitor
from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import recorded_config
from ddpm_jax import train_step

def load(config, workdir):
  """(model, EMA params, step) of config.sampling.checkpoint in workdir; converted weights (step 0) from
  config.restore_from if workdir has no checkpoint. One-line error if there is nothing to load, or if workdir's run
  recorded settings that read its params differently (recorded_config.check_readable: a v-model read as an ε-model
  would sample noise)."""
  recorded_config.check_readable(config, workdir)
  model = train_step.create_model(config)
  tx, _ = train_step.create_optimizer(config.optim)
  abstract = jax.eval_shape(lambda: train_step.create_train_state(jax.random.PRNGKey(0), model, tx,
                                                                  images.image_shape(config.data)))
  choice = config.sampling.checkpoint
  if choice not in ("latest", "best_fid"):
    raise ValueError(f"sampling.checkpoint must be 'latest' or 'best_fid', got {choice!r}.")
  if choice == "best_fid":
    params, info = fid_monitor.restore_best(workdir, abstract.params)
    logging.info("Best-FID EMA params of step %d (FID %.3f during training)", info["step"], info["fid"])
    return model, params, int(info["step"])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  restored = None
  if fileio.isdir(ckpt_dir):
    checkpointer = checkpointing.Checkpointer(ckpt_dir)
    try:
      restored = checkpointer.restore(abstract)
    finally:
      checkpointer.close()
  if restored is None and config.restore_from:
    return model, convert.load_converted(config.restore_from, abstract.params, config), 0
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first (--mode=train), point --workdir at a "
                            "trained run, or pass converted weights with --config.restore_from=DIR.")
  state, _ = restored
  logging.info("EMA params of step %d from %s", int(state.step), ckpt_dir)
  return model, state.ema_params, int(state.step)
