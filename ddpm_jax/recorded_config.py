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
# grid and what its student predicts; reading the round's params takes the student's mean type (read_differences).
ROUND_FIELDS = ("distill.start_steps", "distill.parameterization", "distill.first_round_parameterization")
# Fixed fields added after runs were made: an older workdir's config.json lacks them, and its run had these values.
ADDED_FIELDS = {"model.num_classes": 0, "model.class_dropout": 0.0, "distill.first_round_parameterization": ""}


def _recorded(workdir):
  """(workdir's recorded config, flat, with ADDED_FIELDS filled in; its distillation round's <steps>, or None if
  workdir is not a round's directory), or (None, None) if workdir recorded none (a new run, or converted weights)."""
  path = os.path.join(workdir, FILENAME)
  if not fileio.exists(path):
    return None, None
  recorded = json.loads(fileio.read_text(path))
  parent, steps = os.path.split(os.path.normpath(workdir))
  start = recorded.get("distill", {}).get("start_steps", 0)
  is_round = os.path.basename(parent) == "distill" and steps.isdigit() and 0 < int(steps) < start
  round_steps = int(steps) if is_round and start % int(steps) == 0 else None
  return {**ADDED_FIELDS, **flax.traverse_util.flatten_dict(recorded, sep=".")}, round_steps


def _compare(recorded, config, fields):
  """[(field, recorded, given), …] over `fields` (and their sub-fields) that differ, FREE_FIELDS aside."""
  given = flax.traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  checked = lambda k: any(k == f or k.startswith(f + ".") for f in fields) and k not in FREE_FIELDS
  return [(k, recorded.get(k), given.get(k)) for k in sorted(set(recorded) | set(given))
          if checked(k) and recorded.get(k) != given.get(k)]


def resume_differences(config, workdir):
  """What a run resuming workdir with `config` would change of TRAINING_FIELDS (and, for a distillation round's
  directory, ROUND_FIELDS): [(field, recorded, given), …]; [] if workdir recorded no config."""
  recorded, round_steps = _recorded(workdir)
  if recorded is None:
    return []
  return _compare(recorded, config, TRAINING_FIELDS + (ROUND_FIELDS if round_steps else ()))


def read_differences(config, workdir):
  """How `config` would read workdir's params differently from how they were trained, over READING_FIELDS: a
  distillation round's params are its student's, read with the mean type the round made it (the round records the
  first teacher's). [(field, recorded, given), …]; [] if workdir recorded no config."""
  recorded, round_steps = _recorded(workdir)
  if recorded is None:
    return []
  if round_steps:
    from ddpm_jax import distillation  # pylint: disable=g-import-not-at-top  # JAX and the model: only for rounds
    form = distillation.student_parameterization(
        ml_collections.ConfigDict(flax.traverse_util.unflatten_dict(recorded, sep=".")), round_steps)
    recorded["diffusion.model_mean_type"] = distillation.STUDENT_MEAN_TYPE[form]
  return _compare(recorded, config, READING_FIELDS)


def describe(diff):
  """'field: recorded -> given; …' of resume_differences() or read_differences()."""
  return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)


def check_readable(config, workdir):
  """Raises a one-line ValueError if workdir's params were trained with a config that reads them differently."""
  diff = read_differences(config, workdir)
  if diff:
    flags = " ".join(f"--config.{k}={old}" for k, old, _ in diff)
    raise ValueError(f"workdir {workdir} was trained with another config ({describe(diff)}); read it with the "
                     f"settings it was trained with: add {flags}.")
