"""Workdir files on local paths and on any filesystem TensorFlow knows: gs:// (TPU pods) and ram:// (tests).

Orbax, clu's writers and tfds already take such paths; this covers the rest (config.json, sample and bits/dim
shards, PNGs, results). Writes go to a temporary name first and are renamed, so a killed run never leaves a
half-written file under the final name. Local paths use Python's own I/O; TensorFlow is imported only for a path
with a scheme (its import is seconds of start-up that sampling from a local workdir does not need).

os.path.join and os.path.dirname work on these paths as they are (gs://bucket/a + b → gs://bucket/a/b).
"""
# Not etils.epath: it has no ram:// (Path("ram://x") raises KeyError), and for gs:// it calls tf.io.gfile anyway.
import glob as glob_lib
import io
import os

import numpy as np

from ddpm_jax import tensorflow_cpu


def _remote(path):
  return "://" in path


def _gfile():
  return tensorflow_cpu.load().io.gfile


def exists(path):
  path = os.fspath(path)
  return _gfile().exists(path) if _remote(path) else os.path.exists(path)


def isdir(path):
  path = os.fspath(path)
  return _gfile().isdir(path) if _remote(path) else os.path.isdir(path)


def makedirs(path):
  path = os.fspath(path)
  if _remote(path):
    _gfile().makedirs(path)
  elif path:
    os.makedirs(path, exist_ok=True)


def glob(pattern):
  """The paths matching pattern, sorted."""
  pattern = os.fspath(pattern)
  return sorted(_gfile().glob(pattern) if _remote(pattern) else glob_lib.glob(pattern))


def _opened(path, mode):
  return _gfile().GFile(path, mode) if _remote(path) else open(path, mode)  # pylint: disable=unspecified-encoding


def _io_errors(path):
  """What an I/O call on path raises: OSError, and for a remote path TensorFlow's own error types."""
  return (OSError, tensorflow_cpu.load().errors.OpError) if _remote(path) else (OSError,)


def _not_found(error):
  return isinstance(error, FileNotFoundError) or type(error).__name__ == "NotFoundError"  # TensorFlow's


def _message(error):
  return getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)  # TensorFlow: .message


def write_bytes(path, data):
  """Writes data to path atomically (temporary name, then rename), creating the directory if needed.

  Raises OSError (not TensorFlow's error types) naming the path, e.g. for a workdir that is not writable.
  """
  path = os.fspath(path)
  tmp = path + ".tmp"
  try:
    makedirs(os.path.dirname(path))
    with _opened(tmp, "wb") as f:
      f.write(data)
    if _remote(path):
      _gfile().rename(tmp, path, overwrite=True)
    else:
      os.replace(tmp, path)
  except _io_errors(path) as e:
    raise OSError(f"cannot write {path}: {_message(e)}") from None


def read_bytes(path):
  """The file's bytes; FileNotFoundError or OSError (not TensorFlow's error types) naming the path."""
  path = os.fspath(path)
  try:
    with _opened(path, "rb") as f:
      return f.read()
  except _io_errors(path) as e:
    if _not_found(e):
      raise FileNotFoundError(f"{path} not found") from None
    raise OSError(f"cannot read {path}: {_message(e)}") from None


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
  """Renames src to dst; an existing dst is an error (as os.rename is not, on POSIX)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if _remote(src):
    _gfile().rename(src, dst, overwrite=False)
  elif os.path.exists(dst):
    raise FileExistsError(f"cannot rename {src}: {dst} exists")
  else:
    os.rename(src, dst)
