"""TensorFlow, imported only where it is needed and kept off the accelerators.

TensorFlow reads data (tfds), writes summaries (clu) and reaches remote filesystems (gs://, ram://). On a GPU
machine it would take the accelerator memory JAX needs, and its import is seconds of start-up, so the modes that
need none of it (sample, sweep and edit on local files) never load it.
"""


def load():
  """`import tensorflow`, with the GPUs hidden from it (before it runs an op; repeating the call is free)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TensorFlow returns early when the list is unchanged
  return tf

