"""Workdir files on any filesystem TensorFlow knows: local paths, gs:// (TPU pods), and ram:// (tests).

Orbax, clu's writers and tfds already take such paths; this covers the rest (config.json, sample and bits/dim
shards, PNGs, results). Writes go to a temporary name first and are renamed, so a killed run never leaves a
half-written file under the final name.

os.path.join and os.path.dirname work on these paths as they are (gs://bucket/a + b → gs://bucket/a/b).
"""
# Not etils.epath: it has no ram:// (Path("ram://x") raises KeyError), and for gs:// it calls tf.io.gfile anyway.
import io
import os

import numpy as np
import tensorflow as tf

exists = tf.io.gfile.exists
isdir = tf.io.gfile.isdir
makedirs = tf.io.gfile.makedirs
glob = tf.io.gfile.glob


def write_bytes(path, data):
  """Writes data to path atomically (temporary name, then rename), creating the directory if needed.

  Raises OSError (not TensorFlow's error types) naming the path, e.g. for a workdir that is not writable.
  """
  path = os.fspath(path)
  tmp = path + ".tmp"
  try:
    makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except tf.errors.OpError as e:
    raise OSError(f"cannot write {path}: {e.message}") from None


def read_bytes(path):
  path = os.fspath(path)
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.NotFoundError:
    raise FileNotFoundError(f"{path} not found") from None
  except tf.errors.OpError as e:
    raise OSError(f"cannot read {path}: {e.message}") from None


def write_text(path, text):
  write_bytes(path, text.encode("utf-8"))


def read_text(path):
  return read_bytes(path).decode("utf-8")


def save_npz(path, **arrays):
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def load_npz(path):
  """Every array of an .npz as a dict, never unpickling (allow_pickle=False)."""
  with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def rename(src, dst):
  tf.io.gfile.rename(src, dst, overwrite=False)
