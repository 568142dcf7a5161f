"""Workdir files through TensorFlow's filesystems: what works on a local path works on ram:// (as on gs://)."""
import io
import uuid

import numpy as np
from PIL import Image
import pytest

from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax.evaluation import fid


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
  return str(tmp_path) if request.param == "local" else f"ram://{uuid.uuid4().hex}"


def test_npz_text_and_png_round_trip_atomically(root):
  path = f"{root}/eval/deep/shard.npz"
  fileio.save_npz(path, arr_0=np.arange(6, dtype=np.uint8).reshape(2, 3), index=np.array([4, 5]))
  loaded = fileio.load_npz(path)
  np.testing.assert_array_equal(loaded["arr_0"], np.arange(6).reshape(2, 3))
  assert loaded["arr_0"].dtype == np.uint8 and list(loaded["index"]) == [4, 5]
  assert fileio.glob(f"{root}/eval/deep/*") == [path]  # no temporary file left behind

  fileio.write_text(f"{root}/config.json", '{"a": 1}')
  fileio.write_text(f"{root}/config.json", '{"a": 2}')  # replaces
  assert fileio.read_text(f"{root}/config.json") == '{"a": 2}'

  grid = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
  images.save_png(f"{root}/samples/grid.png", grid, upscale=2)
  with Image.open(io.BytesIO(fileio.read_bytes(f"{root}/samples/grid.png"))) as img:
    np.testing.assert_array_equal(np.asarray(img)[::2, ::2], grid)


def test_stats_files_and_errors(root):
  fid.save_stats(f"{root}/stats.npz", np.ones(4), np.eye(4))
  mu, sigma = fid.load_stats(f"{root}/stats.npz", dim=4)
  np.testing.assert_array_equal(mu, np.ones(4))
  np.testing.assert_array_equal(sigma, np.eye(4))
  with pytest.raises(FileNotFoundError, match="not found"):
    fileio.read_bytes(f"{root}/missing.npz")


def test_a_pickled_npz_is_refused(tmp_path):
  buf = io.BytesIO()
  np.savez(buf, arr_0=np.array([{"a": 1}], dtype=object))
  fileio.write_bytes(str(tmp_path / "obj.npz"), buf.getvalue())
  with pytest.raises(ValueError, match="allow_pickle"):
    fileio.load_npz(str(tmp_path / "obj.npz"))


def test_unwritable_path_is_an_oserror_naming_it(tmp_path):
  (tmp_path / "file").write_text("mine")
  with pytest.raises(OSError, match="cannot write .*file/sub/x.json"):
    fileio.write_text(str(tmp_path / "file" / "sub" / "x.json"), "{}")
  assert (tmp_path / "file").read_text() == "mine"
