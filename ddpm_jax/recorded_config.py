"""The config a workdir's run recorded (WORKDIR/config.json), compared with the config of a run that resumes it or
reads its params.

A checkpoint does not say what its params mean: the same tree is an ε-, an x_0- or a v-network, for any noise
schedule. Training records its config and refuses to resume with a different one; sampling, evaluation, editing
and distillation read params with the same comparison over the fields that decide what the network computes, so
that a v-model sampled as an ε-model is a one-line error, not a page of noise.
"""
import json
import os

import flax
import ml_collections

from ddpm_jax import fileio

FILENAME = "config.json"
# Fields that fix the shapes and meaning of a checkpoint: a resumed training run must not change them.
TRAINING_FIELDS = ("model", "diffusion", "data.image_size", "data.channels", "training.batch_size")
# What a run that only reads the params must agree on. Not model_var_type: the paper samples one ε-model with either
# fixed variance (a learned one changes the output's shape, which the restore checks); not the loss or batch size.
READING_FIELDS = ("model", "data.image_size", "data.channels", "diffusion.num_timesteps", "diffusion.beta_schedule",
                  "diffusion.beta_start", "diffusion.beta_end", "diffusion.model_mean_type")
# …except these, which change how the same params are computed or trained, not what they are: a resumed run may
# switch them (and a workdir older than one of them resumes).
FREE_FIELDS = ("model.dtype", "model.remat", "model.conv_impl", "model.dropout")
# A distillation round's directory (WORKDIR/distill/<steps>) records its run's config: the trained model's, whose
# diffusion.model_mean_type is the first teacher's, with its distill fields. Resuming a round must also keep its
# grid and what its student predicts; reading the round's params takes the student's mean type (student_mean_type).
ROUND_FIELDS = ("distill.start_steps", "distill.parameterization", "distill.first_round_parameterization")
# Fixed fields added after runs were made: an older workdir's config.json lacks them, and its run had these values.
ADDED_FIELDS = {"model.num_classes": 0, "model.class_dropout": 0.0, "distill.first_round_parameterization": ""}


def _flat(config_json):
  return flax.traverse_util.flatten_dict(json.loads(config_json), sep=".")


def _round_steps(workdir, recorded):
  """<steps> if workdir is the directory of a round of the recorded run's distillation (WORKDIR/distill/<steps>, a
  step count that halves distill.start_steps), else None."""
  parent, steps = os.path.split(os.path.normpath(workdir))
  if os.path.basename(parent) != "distill" or not steps.isdigit():
    return None
  start = recorded.get("distill", {}).get("start_steps", 0)
  return int(steps) if 0 < int(steps) < start and start % int(steps) == 0 else None


def _student_mean_type(recorded, steps):
  from ddpm_jax import distillation  # pylint: disable=g-import-not-at-top  # JAX and the model: only for rounds
  config = ml_collections.ConfigDict(recorded)
  return distillation.STUDENT_MEAN_TYPE[distillation.student_parameterization(config, steps)]


def differences(config, workdir, fields):
  """[(field, recorded, given), …] over `fields` (and their sub-fields) between workdir's recorded config and
  `config`; [] if workdir recorded none (a new run, or converted weights). A distillation round's directory is
  compared as ROUND_FIELDS says."""
  path = os.path.join(workdir, FILENAME)
  if not fileio.exists(path):
    return []
  text = fileio.read_text(path)
  old = {**ADDED_FIELDS, **_flat(text)}
  steps = _round_steps(workdir, json.loads(text))
  if steps and fields == READING_FIELDS:
    old["diffusion.model_mean_type"] = _student_mean_type(json.loads(text), steps)
  if steps and fields == TRAINING_FIELDS:
    fields = fields + ROUND_FIELDS
  new = _flat(config.to_json_best_effort())
  checked = lambda k: any(k == f or k.startswith(f + ".") for f in fields) and k not in FREE_FIELDS
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if checked(k) and old.get(k) != new.get(k)]


def describe(diff):
  """'field: recorded -> given; …' of differences()."""
  return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)


def check_readable(config, workdir):
  """Raises a one-line ValueError if workdir's params were trained with a config that reads them differently."""
  diff = differences(config, workdir, READING_FIELDS)
  if diff:
    flags = " ".join(f"--config.{k}={old}" for k, old, _ in diff)
    raise ValueError(f"workdir {workdir} was trained with another config ({describe(diff)}); read it with the "
                     f"settings it was trained with: add {flags}.")
