"""TensorFlow, imported only where it is needed, without Keras, and kept off the accelerators.

TensorFlow reads data (tfds), writes summaries (clu) and reaches remote filesystems (gs://, ram://). On a GPU
machine it would take the accelerator memory JAX needs, and its import is seconds of start-up, so the modes that
need none of it (sample, sweep and edit on local files) never load it.
"""
import os
import sys
import types


def load():
  """`import tensorflow` (without Keras: _import_without_keras), with the GPUs hidden from it (before it runs an op;
  repeating the call is free)."""
  tf = sys.modules.get("tensorflow") or _import_without_keras()
  tf.config.set_visible_devices([], "GPU")  # TensorFlow returns early when the list is unchanged
  return tf


class _NoKerasCallbacks(types.ModuleType):
  """Stands in for tensorboard.plugins.hparams._keras, whose import subclasses a Keras callback."""

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    def unavailable(*args, **kwargs):
      raise ImportError(f"TensorBoard's hparams {name} needs Keras, which ddpm_jax's TensorFlow import skipped; "
                        "import tensorboard.plugins.hparams before ddpm_jax to use it.")
    return unavailable


def _import_without_keras():
  """Imports and returns TensorFlow without Keras, which nothing here uses and which costs every training process
  ~1 CPU-s and 100 MB at start-up (docs/performance.md). TensorFlow imports Keras eagerly unless TF_USE_LEGACY_KERAS
  is set (it then tries tf_keras and moves on when that is absent), and TensorBoard's hparams plugin, which clu's
  summary writer imports, subclasses a Keras callback at import. Afterwards tf.keras still loads Keras on first use:
  only the variable's value during the import and the hparams plugin's Keras callback are changed."""
  if "keras" not in sys.modules:
    name = "tensorboard.plugins.hparams._keras"
    sys.modules.setdefault(name, _NoKerasCallbacks(name))
  previous = os.environ.get("TF_USE_LEGACY_KERAS")
  os.environ["TF_USE_LEGACY_KERAS"] = "1"
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  finally:
    if previous is None:
      del os.environ["TF_USE_LEGACY_KERAS"]
    else:
      os.environ["TF_USE_LEGACY_KERAS"] = previous
  return tf
