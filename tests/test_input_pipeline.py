"""Data sources on files the tests write (and tfds' mock data), the deterministic order, and one-line errors."""
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import input_pipeline as ip


def data_config(**kw):
  c = ml_collections.ConfigDict(dict(source="npz", name="test", split="train", data_dir="", path="",
                                     image_key="image", image_size=4, channels=1, random_flip=False))
  c.update(kw)
  return c


@pytest.fixture
def indexed_npz(tmp_path):
  """10 images of 4×4×1, image i filled with i·10 (its identity survives the [-1, 1] mapping)."""
  path = str(tmp_path / "idx.npz")
  np.savez(path, arr_0=(np.arange(10, dtype=np.uint8)[:, None, None, None] * 10) * np.ones((1, 4, 4, 1), np.uint8))
  return path


def ids(batch):
  return np.round((batch[..., 0, 0, 0] + 1) * 127.5 / 10).astype(int)


def test_order_is_a_pure_function_of_seed_and_step(indexed_npz):
  c = data_config(path=indexed_npz)
  a = ip.create_dataset(c, seed=3, global_batch_size=5, process_index=0, process_count=1)
  b = ip.create_dataset(c, seed=3, global_batch_size=5, process_index=0, process_count=1)
  for s in (0, 1, 7):
    np.testing.assert_array_equal(a[s], b[s])
  assert a[0].dtype == np.float32 and a[0].shape == (5, 4, 4, 1)
  # Every epoch (2 steps of 5) holds each image once, and epochs are reshuffled.
  epochs = [np.concatenate([ids(a[2 * e]), ids(a[2 * e + 1])]) for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(10))
  assert not (np.array_equal(epochs[0], epochs[1]) and np.array_equal(epochs[1], epochs[2]))
  c2 = ip.create_dataset(c, seed=4, global_batch_size=5, process_index=0, process_count=1)
  assert not np.array_equal(ids(c2[0]), ids(a[0]))  # another seed, another order


def test_resuming_at_step_k_and_host_split_give_the_same_batches(indexed_npz):
  c = data_config(path=indexed_npz)
  it = ip.batches(c, seed=0, global_batch_size=4, start_step=0, num_local_devices=2, process_index=0,
                  process_count=1)
  straight = [next(it) for _ in range(6)]
  assert straight[0].shape == (2, 2, 4, 4, 1)
  resumed = ip.batches(c, seed=0, global_batch_size=4, start_step=3, num_local_devices=2, process_index=0,
                       process_count=1)
  for s in range(3, 6):
    np.testing.assert_array_equal(next(resumed), straight[s])
  hosts = [ip.create_dataset(c, seed=0, global_batch_size=4, process_index=h, process_count=2) for h in (0, 1)]
  for s in range(6):
    np.testing.assert_array_equal(np.concatenate([hosts[0][s], hosts[1][s]]), straight[s].reshape(4, 4, 4, 1))


def test_flips_are_random_per_example_and_deterministic(tmp_path):
  path = str(tmp_path / "asym.npz")
  img = np.zeros((1, 4, 4, 1), np.uint8)
  img[0, :, 0] = 255  # a bright left column: flipped, it is on the right
  np.savez(path, arr_0=np.repeat(img, 64, axis=0))
  flipped = lambda batch: batch[:, 0, -1, 0] > 0
  on = ip.create_dataset(data_config(path=path, random_flip=True), seed=0, global_batch_size=64, process_index=0,
                         process_count=1)[0]
  assert 10 < flipped(on).sum() < 54
  np.testing.assert_array_equal(on, ip.create_dataset(data_config(path=path, random_flip=True), seed=0,
                                                      global_batch_size=64, process_index=0, process_count=1)[0])
  off = ip.create_dataset(data_config(path=path), seed=0, global_batch_size=64, process_index=0, process_count=1)[0]
  assert flipped(off).sum() == 0


def test_folder_source_resizes_crops_and_converts(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  wide = np.zeros((8, 16, 3), np.uint8)
  wide[:, 4:12] = (255, 0, 0)  # the centre square is red, the sides black
  Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
  Image.fromarray(np.full((6, 6), 77, np.uint8)).save(tmp_path / "a" / "b" / "gray.jpg", quality=100)
  (tmp_path / "notes.txt").write_text("not an image")
  src = ip.make_source(data_config(source="folder", path=str(tmp_path), image_size=4, channels=3))
  assert len(src) == 2
  gray, red = src[0], src[1]  # sorted paths: a/b/gray.jpg, a/wide.png
  assert red.shape == (4, 4, 3) and red.dtype == np.uint8
  # The centre crop kept the red square (bicubic resampling may tint the border columns with the black sides).
  assert red[:, 1:3, 0].min() > 200 and red[:, 1:3, 1:].max() < 40
  assert np.all(np.abs(gray.astype(int) - 77) <= 2) and gray.shape == (4, 4, 3)  # gray → RGB by repetition
  one = ip.make_source(data_config(source="folder", path=str(tmp_path), image_size=4, channels=1))
  np.testing.assert_allclose(one[1][:, 1:3, 0], 76, atol=2)  # red → L with Pillow's weights (0.299·255)


def test_digits_source_is_sklearns_digits():
  from sklearn.datasets import load_digits
  src = ip.make_source(data_config(source="digits", image_size=16))
  assert len(src) == 1797 and src[0].shape == (16, 16, 1) and src[0].dtype == np.uint8
  small = np.asarray(Image.fromarray(src[0][..., 0]).resize((8, 8), Image.BILINEAR), np.float64)
  ref = load_digits().images[0]
  assert np.corrcoef(small.ravel(), ref.ravel())[0, 1] > 0.9


def test_tfds_source_on_mock_cifar10():
  tfds = pytest.importorskip("tensorflow_datasets")
  c = data_config(source="tfds", name="cifar10", image_size=32, channels=3, random_flip=True)
  with tfds.testing.mock_data(num_examples=20):
    src = ip.make_source(c)
    assert len(src) == 20
    raw = [src[i] for i in range(20)]
    ds = ip.create_dataset(c, seed=0, global_batch_size=20, process_index=0, process_count=1)
    batch = ds[0]
  assert batch.shape == (20, 32, 32, 3) and batch.dtype == np.float32
  assert batch.min() >= -1 and batch.max() <= 1
  np.testing.assert_allclose((batch + 1) * 127.5, np.round((batch + 1) * 127.5), atol=1e-3)  # on the uint8 grid
  as_uint8 = np.round((batch + 1) * 127.5).astype(np.uint8)
  plain = sum(any(np.array_equal(b, r) for r in raw) for b in as_uint8)
  mirrored = sum(any(np.array_equal(b, r[:, ::-1]) for r in raw) for b in as_uint8)
  assert plain > 0 and mirrored > 0 and plain + mirrored >= 20


def _one_line_error(c, match, **kw):
  with pytest.raises(ValueError, match=match) as e:
    ip.create_dataset(c, seed=0, global_batch_size=kw.get("batch", 4), process_index=0,
                      process_count=kw.get("hosts", 1))
  assert "\n" not in str(e.value)


def test_bad_inputs_fail_with_one_line_errors(tmp_path, indexed_npz):
  _one_line_error(data_config(source="hdf5"), "unknown data.source 'hdf5'")
  _one_line_error(data_config(path=str(tmp_path / "missing.npz")), "is not a file")
  np.savez(tmp_path / "noarr.npz", images=np.zeros((2, 4, 4), np.uint8))
  _one_line_error(data_config(path=str(tmp_path / "noarr.npz")), "has no 'arr_0'")
  np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4), np.float32))
  _one_line_error(data_config(path=str(tmp_path / "float.npz")), "arr_0 is float32")
  np.savez(tmp_path / "size.npz", arr_0=np.zeros((2, 5, 5), np.uint8))
  _one_line_error(data_config(path=str(tmp_path / "size.npz")), "not 4×4×1")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  _one_line_error(data_config(path=str(tmp_path / "junk.npz")), "cannot read")
  _one_line_error(data_config(source="folder", path=str(tmp_path / "nodir")), "is not a directory")
  (tmp_path / "empty").mkdir()
  _one_line_error(data_config(source="folder", path=str(tmp_path / "empty")), "holds no .png/.jpg/.jpeg")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG garbage")
  src = ip.make_source(data_config(source="folder", path=str(tmp_path / "bad")))
  with pytest.raises(ValueError, match="cannot decode image .*broken.png"):
    src[0]
  _one_line_error(data_config(path=indexed_npz), "not divisible by the 3 hosts", batch=4, hosts=3)
  _one_line_error(data_config(channels=2, path=indexed_npz), "data.channels must be 1 or 3")
  with pytest.raises(ValueError, match="not divisible by the 3 devices"):
    next(ip.batches(data_config(path=indexed_npz), seed=0, global_batch_size=4, start_step=0, num_local_devices=3,
                    process_index=0, process_count=1))


def test_tfds_errors_never_download(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  _one_line_error(data_config(source="tfds", name="no_such_dataset_xyz"), "unknown tfds data set")
  _one_line_error(data_config(source="tfds", name="mnist", data_dir=str(tmp_path)), "is not prepared in")
