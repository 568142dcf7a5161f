"""Validating a config before a run: every field's type and range, the rules between fields, and the device count.

main.py calls `validate` before it imports TensorFlow or builds anything, so a bad value costs a second and one line,
"<field> = <value>: <what is wrong>; <what is valid>", instead of a traceback after checkpoints were written. Fields
an older config lacks are skipped. This module imports JAX but no TensorFlow; the modules whose constants and checks
it reuses are imported on first use, when a rule needs them.
"""
import copy
import dataclasses
import difflib
import functools
import numbers
import os
import re
import types
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ddpm_jax import devices

MODES = ("train", "sample", "eval", "sweep", "distill", "edit")


def device_count_before_joining(coordinator_address=None):
  """jax.device_count() for a process that runs alone; None for one about to join a cluster (cluster.py).

  jax.distributed.initialize must come before anything starts a JAX backend, and only then is the count known.
  """
  from ddpm_jax import cluster  # pylint: disable=g-import-not-at-top
  joining = cluster._cluster_detected()  # pylint: disable=protected-access
  return None if coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or joining else jax.device_count()


# ---------------------------------------------------------------------------------------------------------------
# Rules for one field, and the table of them.

@dataclasses.dataclass(frozen=True)
class Rule:
  """problem(value): what is wrong with value ('' if nothing); valid: what would do, for the message."""
  problem: Callable[[Any], str]
  valid: str


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _a(v):
  """'a float', 'an int': the type of a value of the wrong type, with its article."""
  name = type(v).__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _meaning(valid, meaning):
  return f"{valid} ({meaning})" if meaning else valid


def integer(lo, meaning=""):
  def problem(v):
    if not _is_int(v):
      return f"{_a(v)}, not an integer"
    return "" if v >= lo else "out of range"
  return Rule(problem, _meaning(f"an integer >= {lo}", meaning))


def number(lo, hi=None, *, lo_open=False, hi_open=False, meaning=""):
  """A real number from lo to hi (None: unbounded), each end included unless *_open."""
  def problem(v):
    if not _is_number(v):
      return f"{_a(v)}, not a number"
    below = v < lo or (lo_open and v == lo)
    above = hi is not None and (v > hi or (hi_open and v == hi))
    return "out of range" if below or above else ""
  valid = (f"a number {'>' if lo_open else '>='} {lo}" if hi is None
           else f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
  return Rule(problem, _meaning(valid, meaning))


def one_of(choices):
  def problem(v):
    if not isinstance(v, bool) and v in choices:
      return ""
    lower = {str(c).lower(): c for c in choices}
    close = difflib.get_close_matches(v.lower(), lower, n=1) if isinstance(v, str) else []
    return "unknown value" + (f" (did you mean {lower[close[0]]!r}?)" if close else "")
  return Rule(problem, "one of " + ", ".join(repr(c) for c in choices))


def checkpoint_choice():
  """'latest', 'best_fid' or 'distill/<steps>' (a distilled student: modes/distill.py)."""
  named = one_of(("latest", "best_fid"))
  def problem(v):
    if isinstance(v, str) and re.fullmatch(r"distill/[1-9][0-9]*", v):
      return ""
    return named.problem(v)
  return Rule(problem, "'latest', 'best_fid', or 'distill/<steps>' (a student of --mode=distill)")


def boolean():
  return Rule(lambda v: "" if isinstance(v, bool) else f"{_a(v)}, not a bool", "True or False")


def text():
  return Rule(lambda v: "" if isinstance(v, str) else f"{_a(v)}, not a string", "a string ('' = unset)")


def sequence(item, *, min_len=0, example=""):
  """A tuple (or list) whose items each pass the rule `item`."""
  def problem(v):
    if not isinstance(v, (tuple, list)):
      return f"{_a(v)}, not a tuple"
    if len(v) < min_len:
      return "empty"
    wrong = [f"item {x!r}: {item.problem(x)}" for x in v if item.problem(x)]
    return wrong[0] if wrong else ""
  valid = f"a {'non-empty ' if min_len else ''}tuple of {item.valid}" + (f", e.g. {example}" if example else "")
  plural = {"an integer": "integers", "a number": "numbers", "one of ": "items from "}
  for singular, many in plural.items():
    valid = valid.replace(singular, many)
  return Rule(problem, valid)


@functools.cache
def field_rules():
  """{dotted field: rule} for every field of configs/cifar10.py, from which the other configs derive."""
  # pylint: disable=g-import-not-at-top  # imported on first use: validate() runs before anything heavy loads
  from ddpm_jax import diffusion
  from ddpm_jax import input_pipeline
  from ddpm_jax import sampling
  from ddpm_jax.models import conv3x3
  # pylint: enable=g-import-not-at-top
  never = "0 = never"
  return {
      "restore_from": text(),
      "seed": integer(0),
      "data.source": one_of(input_pipeline.SOURCES),
      "data.name": text(),
      "data.split": text(),
      "data.data_dir": text(),
      "data.path": text(),
      "data.image_key": text(),
      "data.label_key": text(),
      "data.image_size": integer(1),
      "data.channels": one_of((1, 3)),
      "data.random_flip": boolean(),
      "data.num_threads": integer(1),
      "model.ch": integer(1, meaning="times each ch_mult a multiple of 32; the paper uses 128"),
      "model.ch_mult": sequence(integer(1), min_len=1, example="(1, 2, 2, 2)"),
      "model.num_res_blocks": integer(1),
      "model.attn_resolutions": sequence(integer(1), example="(16,)"),
      "model.dropout": number(0, 1, hi_open=True, meaning="0 = none"),
      "model.resamp_with_conv": boolean(),
      "model.dtype": one_of(("float32", "bfloat16", "float16")),
      "model.remat": boolean(),
      "model.conv_impl": one_of(conv3x3.IMPLS),
      "model.num_classes": integer(0, meaning="0 = unconditional"),
      "model.class_dropout": number(0, 1, hi_open=True, meaning="0 = never; guidance needs > 0"),
      "diffusion.beta_schedule": one_of(diffusion.BETA_SCHEDULES),
      "diffusion.beta_start": number(0, 1, lo_open=True),
      "diffusion.beta_end": number(0, 1, lo_open=True),
      "diffusion.num_timesteps": integer(1),
      "diffusion.model_mean_type": one_of(diffusion.MEAN_TYPES),
      "diffusion.model_var_type": one_of(diffusion.VAR_TYPES),
      "diffusion.loss_type": one_of(diffusion.LOSS_TYPES),
      "optim.lr": number(0, lo_open=True),
      "optim.warmup_steps": integer(0, meaning="0 = none"),
      "optim.lr_anneal_steps": integer(0, meaning="0 = constant lr after warmup"),
      "optim.beta1": number(0, 1, hi_open=True),
      "optim.beta2": number(0, 1, hi_open=True),
      "optim.eps": number(0, lo_open=True),
      "optim.grad_clip": number(0, lo_open=True),
      "optim.ema_decay": number(0, 1, hi_open=True, meaning="0 = no averaging"),
      "training.batch_size": integer(1),
      "training.num_train_steps": integer(1),
      "training.log_every_steps": integer(0, meaning="0 = only when checkpointing"),
      "training.checkpoint_every_steps": integer(0, meaning="0 = only at the end and on preemption"),
      "training.keep_checkpoints": integer(1),
      "training.sample_every_steps": integer(0, meaning=never),
      "training.num_grid_samples": integer(1),
      "training.skip_nonfinite_steps": boolean(),
      "training.fid_every_steps": integer(0, meaning=never),
      "training.fid_num_samples": integer(1),
      "training.fid_num_steps": integer(0, meaning="0 = the full chain"),
      "training.fid_method": one_of(sampling.FEW_STEP_METHODS),
      "training.steps_per_dispatch": integer(1),
      "sampling.num_samples": integer(1),
      "sampling.batch_size": integer(1),
      "sampling.clip_denoised": boolean(),
      "sampling.checkpoint": checkpoint_choice(),
      "sampling.num_steps": integer(0, meaning="0 = all T"),
      "sampling.method": one_of(sampling.METHODS),
      "sampling.eta": number(0, meaning="0 = deterministic DDIM"),
      "sampling.order": integer(1),
      "sampling.spacing": one_of(sampling.SPACINGS),
      "sampling.analytic_num_examples": integer(1),
      "sampling.guidance_scale": number(0, meaning="0 = no guidance"),
      "sampling.labels": sequence(integer(0), example="(3,) or (0, 7); () = every class in turn"),
      "eval.num_samples": integer(0, meaning="0 skips FID and IS"),
      "eval.ref_stats": text(),
      "eval.inception_weights": text(),
      "eval.inception_batch_size": integer(1),
      "eval.bpd_num_examples": integer(-1, meaning="-1 = all, 0 skips bits/dim"),
      "eval.bpd_split": text(),
      "eval.bpd_batch_size": integer(1),
      "eval.figures": boolean(),
      "eval.figures_num_examples": integer(1),
      "eval.sweep_methods": sequence(one_of(sampling.METHODS), min_len=1),
      "eval.sweep_steps": sequence(integer(1), min_len=1, example="(10, 100, 1000)"),
      "distill.start_steps": integer(2),
      "distill.end_steps": integer(1),
      "distill.steps_per_round": integer(1),
      "distill.first_round_steps": integer(0, meaning="0 = distill.steps_per_round"),
      "distill.last_round_steps": integer(0, meaning="0 = distill.steps_per_round"),
      "distill.lr": number(0, lo_open=True),
      "distill.lr_schedule": one_of(("linear", "constant")),
      "distill.dropout": number(0, 1, hi_open=True, meaning="0 = none"),
      "distill.ema_decay": number(0, 1, hi_open=True, meaning="0 = no averaging"),
      "distill.parameterization": one_of(("v", "x", "eps")),
      "distill.first_round_parameterization": one_of(("", "v", "x", "eps")),
      "edit.task": one_of(("inpaint", "sdedit")),
      "edit.inputs": text(),
      "edit.num_images": integer(1),
      "edit.masks": text(),
      "edit.num_steps": integer(0, meaning="0 = all T"),
      "edit.jumps": integer(1, meaning="1 = no resampling"),
      "edit.jump_length": integer(1),
      "edit.strength": number(0, 1, lo_open=True),
  }


# ---------------------------------------------------------------------------------------------------------------

_ABSENT = object()


def _get(config, field, default=_ABSENT):
  """config's value at a dotted field; default if an older config lacks it (or its group)."""
  node = config
  for key in field.split("."):
    node = node.get(key, _ABSENT) if hasattr(node, "get") else _ABSENT
    if node is _ABSENT:
      return default
  return node


def _fail(field, value, wrong, valid):
  raise ValueError(f"{field} = {value!r}: {wrong}; use {valid}.")


def fill_missing(config, defaults):
  """Adds to `config` every field of `defaults` it lacks (a config written before the field existed); returns their
  dotted names. The one place defaults enter: the code reads every field from the config, with no fallbacks."""
  filled = []

  def fill(node, base, prefix):
    for key, value in base.items():
      if key not in node:
        node[key] = copy.deepcopy(value)
        filled.append(prefix + key)
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], value, f"{prefix}{key}.")
  with config.unlocked():
    fill(config, defaults, "")
  return filled


def validate(config, mode, num_devices=None):
  """Raises a one-line ValueError about the first field of `config` that a --mode=`mode` run cannot use.

  num_devices: the run's global device count, which batch sizes must be multiples of, or a function returning it
  (called only once every other rule has passed, so a bad field is reported without starting a JAX backend); None
  skips those rules: a process that is to join a cluster does not know the count yet, and the modules check again.
  """
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}.")
  for field, rule in field_rules().items():
    value = _get(config, field)
    if value is not _ABSENT and rule.problem(value):
      _fail(field, value, rule.problem(value), rule.valid)
  _check_model_and_diffusion(config)
  _check_conditioning(config)
  if _reads_data(config, mode):
    _check_data(config.data)
  shared = _MODE_CHECKS[mode](config)
  num_devices = num_devices() if callable(num_devices) else num_devices
  if num_devices:
    for field, value in shared:
      devices.check_divisible(field, value, num_devices)


def _check_model_and_diffusion(config):
  """The U-Net's own checks (channels, image size, attention resolutions) and the loss/variance pairing."""
  from ddpm_jax import train_step  # pylint: disable=g-import-not-at-top
  train_step.create_model(config).check_image_size(config.data.image_size)
  d = config.diffusion
  learned = d.model_var_type in ("learned", "learned_range")
  if d.loss_type == "mse" and learned:
    _fail("diffusion.loss_type", d.loss_type, f"L_simple cannot train model_var_type {d.model_var_type!r}",
          "'kl' or 'hybrid', or a fixed model_var_type")
  if d.loss_type == "hybrid" and not learned:
    _fail("diffusion.loss_type", d.loss_type, f"needs a learned variance, not {d.model_var_type!r}",
          "'mse', or model_var_type 'learned' or 'learned_range'")


def _check_conditioning(config):
  """Labels and guidance only for a class-conditional model, and labels among its classes."""
  num_classes = _get(config, "model.num_classes", 0)
  guidance, labels = _get(config, "sampling.guidance_scale", 0.0), _get(config, "sampling.labels", ())
  if not num_classes:
    if guidance:
      _fail("sampling.guidance_scale", guidance, "guidance needs a class-conditional model",
            "0, or a model trained with model.num_classes > 0")
    return
  if labels and max(labels) >= num_classes:
    _fail("sampling.labels", labels, f"label {max(labels)} is not one of the {num_classes} classes",
          f"labels from 0 to {num_classes - 1}, or () for every class in turn")


def _reads_data(config, mode):
  """Whether the run reads config.data's examples: training, FID reference statistics, bits/dim, figures, or
  Analytic-DPM's estimate of E‖ε̂‖²."""
  from ddpm_jax import analytic_dpm  # pylint: disable=g-import-not-at-top  # as field_rules' imports
  fid = _get(config, "eval.num_samples", 1) > 0 and not _get(config, "eval.ref_stats", "")
  methods = (_get(config, "sampling.method", "ancestral"),) + tuple(
      _get(config, "eval.sweep_methods", ()) if mode == "sweep" else ())
  if mode != "train" and analytic_dpm.METHOD in methods:
    return True
  if mode == "eval":
    return fid or _get(config, "eval.bpd_num_examples", 1) != 0 or _get(config, "eval.figures", True)
  if mode == "edit":
    return not _get(config, "edit.inputs", "")
  return mode in ("train", "distill") or (mode == "sweep" and fid)


def _check_data(data):
  if data.source == "tfds":
    for field in ("name", "split"):
      if not data.get(field, "?"):
        _fail(f"data.{field}", data[field], "empty", "the tfds data set's name and split, e.g. 'cifar10' and 'train'")
  elif data.source in ("folder", "npz") and not data.get("path", "?"):
    _fail("data.path", data.path, f"empty, but data.source {data.source!r} reads it",
          "a directory of PNG/JPEG files" if data.source == "folder" else "an .npz file holding arr_0 (uint8 NHWC)")


def _check_steps(field, num_steps, config, method, eta=0.0, value=None):
  """A chain of num_steps (0 = all T) reverse steps, from `value` (a tuple holding it; None: num_steps itself) of
  `field`: at most T, and one that `method` can run (sampling.py, solvers.py)."""
  # pylint: disable=g-import-not-at-top
  from ddpm_jax import diffusion
  from ddpm_jax import sampling
  from ddpm_jax import solvers
  # pylint: enable=g-import-not-at-top
  T = config.diffusion.num_timesteps  # pylint: disable=invalid-name
  item = "" if value is None else f"item {num_steps}: "
  value = num_steps if value is None else value
  if num_steps > T:
    _fail(field, value, f"{item}more than the diffusion's T = {T} steps", f"integers from 1 to {T}" if item else
          f"an integer from 0 (all) to {T}")
  chain = types.SimpleNamespace(model_var_type=config.diffusion.model_var_type, num_timesteps=T)
  s = config.sampling
  try:
    # The sweep runs the chains (ancestral, DDIM) with their own spacing, whatever sampling.spacing says.
    spacing = s.spacing if method in solvers.METHODS or field != "eval.sweep_steps" else "auto"
    sampling.check_sampler(chain, num_steps or T, method, eta, s.order, spacing)
    if method in solvers.METHODS:
      if not num_steps:
        raise ValueError("a solver needs num_steps >= 1 network calls (10-20 is its range), not 0 = all T")
      d = config.diffusion
      betas = diffusion.get_beta_schedule(d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end,
                                          num_timesteps=T)
      solvers.solver_timesteps(T, num_steps, solvers.spacing_of(s.spacing),
                               alphas_cumprod=np.cumprod(1.0 - betas))
  except ValueError as e:
    raise ValueError(f"{field} = {value!r}: {item}with sampling method {method!r}, {e}") from None


# Each mode's own rules; each returns the (field, value) pairs that must be multiples of the device count.

def _check_train(config):
  """Step counts the compiled call of training.steps_per_dispatch steps can hit (modes/train.py), and the batches."""
  t = config.training
  warmup, anneal = _get(config, "optim.warmup_steps", 0), _get(config, "optim.lr_anneal_steps", 0)
  if 0 < anneal <= warmup:
    _fail("optim.lr_anneal_steps", anneal, f"not after the warmup's {warmup} steps (the lr falls to 0 after it)",
          f"0 or more than {warmup}; for distillation, rounds longer than optim.warmup_steps")
  k = t.get("steps_per_dispatch", 1)
  for name in ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
               "fid_every_steps"):
    every = t.get(name, 0)
    if every % k:
      _fail(f"training.{name}", every, f"not a multiple of training.steps_per_dispatch = {k}",
            f"a multiple of {k}, such as {max(k, every - every % k)}")
  if not t.get("fid_every_steps", 0):
    return [("training.batch_size", t.batch_size)]
  fid_steps = t.get("fid_num_steps", 0)  # fid_monitor.py: n > 0 steps of training.fid_method
  _check_steps("training.fid_num_steps", fid_steps, config, t.get("fid_method", "ddim") if fid_steps else "ancestral")
  return [("training.batch_size", t.batch_size), ("training.fid_num_samples", t.fid_num_samples)]


def _check_sample(config):
  _check_steps("sampling.num_steps", _get(config, "sampling.num_steps", 0), config,
               _get(config, "sampling.method", "ancestral"), _get(config, "sampling.eta", 0.0))
  return [("sampling.batch_size", config.sampling.batch_size)]


def _check_eval(config):
  shared = _check_sample(config) if _get(config, "eval.num_samples", 1) > 0 else []
  if _get(config, "eval.bpd_num_examples", 1) != 0:
    shared.append(("eval.bpd_batch_size", _get(config, "eval.bpd_batch_size", 256)))
  return shared


def _check_sweep(config):
  """Every (method, steps) pair of eval.sweep_methods × eval.sweep_steps, up front: a sweep runs for hours."""
  if _get(config, "eval.num_samples", 1) == 0:
    _fail("eval.num_samples", 0, "a sweep measures FID, which needs samples", "an integer >= 1")
  sweep_steps = _get(config, "eval.sweep_steps", ())
  for method in _get(config, "eval.sweep_methods", ()):
    for steps in sweep_steps:
      _check_steps("eval.sweep_steps", steps, config, method, _get(config, "sampling.eta", 0.0), sweep_steps)
  return [("sampling.batch_size", config.sampling.batch_size)]


def _check_distill(config):
  """The rounds (modes/distill.py), the first teacher's grid, and each round's training (train's own rules)."""
  from ddpm_jax import distillation  # pylint: disable=g-import-not-at-top
  d = config.distill
  try:
    distillation.round_steps(d.start_steps, d.end_steps)
  except ValueError:
    _fail("distill.start_steps", d.start_steps, f"not distill.end_steps = {d.end_steps} times a power of two (≥ 2)",
          "e.g. 64 with end_steps 4")
  if d.start_steps > config.diffusion.num_timesteps:
    _fail("distill.start_steps", d.start_steps, f"more than the diffusion's T = {config.diffusion.num_timesteps}",
          f"at most {config.diffusion.num_timesteps}")
  warmup = _get(config, "optim.warmup_steps", 0)
  for name in ("steps_per_round", "first_round_steps", "last_round_steps"):
    if d.lr_schedule == "linear" and 0 < d[name] <= warmup:
      _fail(f"distill.{name}", d[name], f"a round no longer than optim.warmup_steps = {warmup}, after which its lr "
            "falls to 0", f"more than {warmup} steps, or distill.lr_schedule 'constant'")
  return _check_train(distillation.round_config(config, d.start_steps // 2))


def _check_edit(config):
  """The edit's chain (editing.py; SDEdit's strength is in range by its rule, and the evenly respaced chain keeps
  t = 0, so every strength has a start), its masks' name or path, and its inputs' path, before the params load."""
  from ddpm_jax import editing  # pylint: disable=g-import-not-at-top
  from ddpm_jax import masks  # pylint: disable=g-import-not-at-top
  e, T = config.edit, config.diffusion.num_timesteps  # pylint: disable=invalid-name
  if e.num_steps > T:
    _fail("edit.num_steps", e.num_steps, f"more than the diffusion's T = {T} steps", f"an integer from 0 (all) to {T}")
  if e.inputs and not os.path.exists(e.inputs):
    _fail("edit.inputs", e.inputs, "no such file or folder", "a folder of images, an .npz, or '' for config.data")
  if e.task == "inpaint":
    if e.masks not in masks.NAMES and not os.path.exists(e.masks):
      _fail("edit.masks", e.masks, "neither a mask name nor an existing file or folder",
            f"one of {masks.NAMES} or the path of an .npz or a folder of PNG masks")
    try:
      editing.repaint_schedule(e.num_steps or T, e.jumps, e.jump_length)
    except ValueError as err:
      _fail("edit.jump_length", e.jump_length, str(err).rstrip("."), "a jump length of at most edit.num_steps")
  return [("sampling.batch_size", config.sampling.batch_size)]


_MODE_CHECKS = dict(train=_check_train, sample=_check_sample, eval=_check_eval, sweep=_check_sweep,
                    distill=_check_distill, edit=_check_edit)
