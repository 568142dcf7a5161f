"""Convert released DDPM weights into a directory main.py loads with --config.restore_from=DIR.

  python -m ddpm_jax.convert --from=tf --input=.../model.ckpt-790000 --output=DIR [--weights=ema|raw]
  python -m ddpm_jax.convert --from=diffusers --input=.../ddpm-cifar10-32 --output=DIR  # pipeline folder, or the
      unet's folder or its diffusion_pytorch_model.safetensors

DIR/params is an Orbax checkpoint of {'params': …}; DIR/ddpm_config.json names the model preset, the source and
(for a diffusers pipeline) the scheduler's settings as our config fields.
Nothing is written to DIR unless the whole conversion succeeds.
"""
import json
import os
import re
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ddpm_jax import errors
from ddpm_jax import pretrained
from ddpm_jax import tensorflow_cpu
from ddpm_jax.models import unet

PRESETS = {"cifar10": (unet.UNetCIFAR10, 32), "256": (unet.UNet256, 256)}
FLAGS = flags.FLAGS
flags.DEFINE_enum("from", None, ["tf", "diffusers"], "Source format.")
flags.DEFINE_string("input", None, "TF checkpoint prefix, or a diffusers .safetensors file or folder.")
flags.DEFINE_string("output", None, "Directory to write (must not exist or be empty).")
flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "TF checkpoints: the EMA shadows (paper's results) or raw weights.")
flags.DEFINE_enum("model", None, list(PRESETS), "U-Net preset; default: chosen from the number of levels.")


def _levels(names, pattern):
  return len({m.group(1) for n in names for m in [re.search(pattern, n)] if m})


# diffusers' DDPMScheduler variance_type → our diffusion.model_var_type.
_VARIANCE = {"fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge", "fixed_small": "fixedsmall",
             "fixed_small_log": "fixedsmall", "learned": "learned", "learned_range": "learned_range"}


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


_SCHEDULE = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}


def settings_from_scheduler(path):
  """Our config fields ('diffusion.model_var_type': …) from a diffusers pipeline folder's scheduler config."""
  if not os.path.isdir(path):
    return {}
  for candidate in ("scheduler_config.json", os.path.join("scheduler", "scheduler_config.json")):
    if os.path.isfile(os.path.join(path, candidate)):
      sched = _read_json(os.path.join(path, candidate))
      break
  else:
    return {}
  variance = sched.get("variance_type", "fixed_small")  # diffusers' default
  schedule = sched.get("beta_schedule", "linear")
  if variance not in _VARIANCE or schedule not in _SCHEDULE:
    raise ValueError(f"scheduler variance_type {variance!r} / beta_schedule {schedule!r} have no counterpart here "
                     f"(known: {sorted(_VARIANCE)} / {sorted(_SCHEDULE)}).")
  return {"diffusion.model_var_type": _VARIANCE[variance], "diffusion.beta_schedule": _SCHEDULE[schedule],
          "diffusion.beta_start": sched.get("beta_start", 1e-4), "diffusion.beta_end": sched.get("beta_end", 0.02),
          "diffusion.num_timesteps": sched.get("num_train_timesteps", 1000),
          "sampling.clip_denoised": bool(sched.get("clip_sample", True))}


def _unet_weights(path):
  """The safetensors file of a diffusers U-Net given as a file, its folder, or a pipeline folder (unet/ inside)."""
  if os.path.isdir(path) and os.path.isdir(os.path.join(path, "unet")) and not os.path.isfile(
      os.path.join(path, "diffusion_pytorch_model.safetensors")):
    return os.path.join(path, "unet")
  return path


def convert(source, path, output, weights="ema", model_name=None):
  """Writes the converted params and their description to output; returns the description."""
  if os.path.exists(output) and os.listdir(output):
    raise ValueError(f"{output} exists and is not empty; choose a new --output (nothing was written).")
  if source == "diffusers":
    state = pretrained.read_safetensors(_unet_weights(path))
    levels = _levels(state, r"^down_blocks\.(\d+)\.")
  else:
    tf = tensorflow_cpu.load()
    try:
      names = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot read {path} as a TF checkpoint ({errors.first_line(e)}).") from None
    levels = _levels(names, r"^model/down_(\d+)/")
  model_name = model_name or {4: "cifar10", 6: "256"}.get(levels)
  if model_name is None:
    raise ValueError(f"{path} has {levels} resolution levels, matching no preset (cifar10: 4, 256: 6); pass --model.")
  factory, size = PRESETS[model_name]
  # A class-conditional diffusers U-Net carries class_embedding [num_class_embeds, 4·ch]: its last label is our null.
  num_classes = state["class_embedding.weight"].shape[0] - 1 if source == "diffusers" and (
      "class_embedding.weight" in state) else 0
  model = factory(num_classes=num_classes)
  target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                             jnp.zeros((1,), jnp.int32)))["params"]
  if source == "diffusers":
    params = pretrained.params_from_diffusers(state, target, len(model.ch_mult))
  else:
    params = pretrained.read_tf_checkpoint(path, target, weights=weights)
  info = dict(model=model_name, image_size=size, source=source, input=os.path.abspath(path),
              weights=weights if source == "tf" else "as saved")
  if source == "diffusers":
    info["config"] = settings_from_scheduler(path)  # the settings the weights were trained with, if stated
    if num_classes:
      info["config"]["model.num_classes"] = num_classes
  parent = os.path.dirname(os.path.abspath(output)) or "."
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, "params"), {"params": params})
    checkpointer.wait_until_finished()
    checkpointer.close()
    with open(os.path.join(staging, "ddpm_config.json"), "w") as f:
      json.dump(info, f, indent=2)
    if os.path.exists(output):
      os.rmdir(output)  # empty, checked above
    os.replace(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return info


def load_converted(directory, abstract_params, config=None):
  """Params written by convert, shaped like abstract_params; one-line error if directory is not a conversion.

  With a config, a U-Net of another size is refused and scheduler settings that differ from it are logged.
  """
  path = os.path.join(os.path.abspath(directory), "params")
  info_path = os.path.join(os.path.abspath(directory), "ddpm_config.json")
  if not os.path.isdir(path) or not os.path.isfile(info_path):
    raise FileNotFoundError(f"{directory} holds no converted params; create it with python -m ddpm_jax.convert.")
  info = _read_json(info_path)
  if config is not None:
    if info["image_size"] != config.data.image_size:
      raise ValueError(f"{directory} holds the {info['model']} U-Net ({info['image_size']}²) but the config is for "
                       f"{config.data.image_size}²; use configs/{'cifar10' if info['model'] == 'cifar10' else 'celebahq256'}.py.")
    for key, value in info.get("config", {}).items():
      section, field = key.split(".")
      if config[section].get(field) != value:
        logging.warning("The converted weights were trained with %s=%s but the config has %s; pass --config.%s=%s "
                        "to match.", key, value, config[section].get(field), key, value)
  target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)}
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path, target)["params"]
  except ValueError as e:
    raise ValueError(f"{directory} does not fit this config's U-Net ({errors.first_line(e)}); sample it with the "
                     f"config of the {info['model']} model.") from None
  finally:
    checkpointer.close()


def main(argv):
  del argv
  for name in ("from", "input", "output"):
    if not FLAGS[name].value:
      sys.exit(f"convert: --{name} is required (see --help)")
  try:
    info = convert(FLAGS["from"].value, FLAGS.input, FLAGS.output, FLAGS.weights, FLAGS.model)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"convert: {e}")
  print(f"Converted {info['source']} weights ({info['weights']}) of the {info['model']} U-Net into {FLAGS.output}.")
  overrides = "".join(f" --config.{k}={v}" for k, v in info.get("config", {}).items())
  print(f"Sample with: python main.py --config=configs/{'cifar10' if info['model'] == 'cifar10' else 'celebahq256'}.py "
        f"--workdir=WORKDIR --mode=sample --config.restore_from={FLAGS.output}{overrides}")


if __name__ == "__main__":
  app.run(main)
