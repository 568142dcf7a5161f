"""Data sources on files the tests write (and tfds' mock data), the deterministic order, and one-line errors."""
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import input_pipeline as ip

N = 10  # images in the indexed .npz


def data_config(**kw):
  c = ml_collections.ConfigDict(dict(source="npz", name="test", split="train", data_dir="", path="",
                                     image_key="image", image_size=4, channels=1, random_flip=False))
  c.update(kw)
  return c


@pytest.fixture
def indexed_npz(tmp_path):
  """N images of 4×4×1: image i is filled with 10·i, its left column is 250 (so a flip moves it to the right)."""
  images = np.repeat(np.arange(N, dtype=np.uint8)[:, None, None, None] * 10, 4, axis=1).repeat(4, axis=2)
  images[:, :, 0] = 250
  path = str(tmp_path / "idx.npz")
  np.savez(path, arr_0=images)
  return path


def ids(batch):
  """Index of each image in a float batch [..., 4, 4, 1] (read from an inner column, which a flip keeps)."""
  return np.round((batch[..., 0, 1, 0] + 1) * 127.5 / 10).astype(int)


def flipped(batch):
  return batch[..., 0, -1, 0] > 0.9  # the 250 column (0.96) ended up on the right


def slots(ds, num_steps):
  """The image index of every global slot of steps 0 .. num_steps-1, in order."""
  return np.concatenate([ids(ds[s]) for s in range(num_steps)])


def test_each_epoch_is_a_fresh_permutation_and_a_pure_function_of_seed(indexed_npz):
  c = data_config(path=indexed_npz, random_flip=True)
  make = lambda seed: ip.create_dataset(c, seed=seed, global_batch_size=4, process_index=0, process_count=1)
  a, b = make(3), make(3)
  for s in (0, 1, 7, 10_000):
    np.testing.assert_array_equal(a[s], b[s])  # a fresh object, the same batches (flips included)
  assert a[0].dtype == np.float32 and a[0].shape == (4, 4, 4, 1)
  # B = 4 does not divide N = 10: batches straddle epochs, yet every epoch holds each image exactly once.
  epochs = slots(a, 15).reshape(6, N)
  for e in epochs:
    assert sorted(e) == list(range(N))
  assert all(not np.array_equal(epochs[e], epochs[e + 1]) for e in range(5))  # reshuffled every epoch
  other = slots(make(4), 5).reshape(2, N)
  assert not np.array_equal(other[0], epochs[0])  # another seed, another order
  # grain reseeds epoch e with (seed + e); the seed is hashed so seed 4's epoch 0 is not seed 3's epoch 1.
  assert not np.array_equal(other[0], epochs[1])


def test_resuming_at_step_k_and_host_split_give_the_same_batches(indexed_npz):
  c = data_config(path=indexed_npz, random_flip=True)
  it = ip.batches(c, seed=0, global_batch_size=4, start_step=0, num_local_devices=2, process_index=0,
                  process_count=1)
  straight = [next(it) for _ in range(8)]
  assert straight[0].shape == (2, 2, 4, 4, 1) and straight[0].dtype == np.float32
  flips = flipped(np.stack(straight))
  assert 0 < flips.sum() < flips.size  # the flips are part of what must be reproduced
  resumed = ip.batches(c, seed=0, global_batch_size=4, start_step=5, num_local_devices=2, process_index=0,
                       process_count=1)
  for s in range(5, 8):
    np.testing.assert_array_equal(next(resumed), straight[s])
  for threads in (1, 5):  # data.num_threads changes how fast batches come, not which
    other = ip.batches(c, seed=0, global_batch_size=4, start_step=0, num_local_devices=2, process_index=0,
                       process_count=1, num_threads=threads)
    for s in range(8):
      np.testing.assert_array_equal(next(other), straight[s])
  hosts = [ip.batches(c, seed=0, global_batch_size=4, start_step=0, num_local_devices=1, process_index=h,
                      process_count=2) for h in (0, 1)]
  for s in range(8):
    host_batches = [next(h) for h in hosts]
    assert host_batches[0].shape == (1, 2, 4, 4, 1)
    np.testing.assert_array_equal(np.concatenate(host_batches, axis=1)[0], straight[s].reshape(4, 4, 4, 1))


def test_flips_are_random_per_example_and_deterministic(tmp_path):
  path = str(tmp_path / "asym.npz")
  img = np.zeros((1, 4, 4, 1), np.uint8)
  img[0, :, 0] = 250
  np.savez(path, arr_0=np.repeat(img, 64, axis=0))
  first = lambda c: ip.create_dataset(c, seed=0, global_batch_size=64, process_index=0, process_count=1)[0]
  on = first(data_config(path=path, random_flip=True))
  assert 10 < flipped(on).sum() < 54
  np.testing.assert_array_equal(on, first(data_config(path=path, random_flip=True)))
  assert flipped(first(data_config(path=path))).sum() == 0


def test_npz_source_adds_the_channel_axis_and_converts_channels(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
  np.savez(tmp_path / "gray.npz", images)  # positional: stored as arr_0, [N, H, W]
  src = ip.make_source(data_config(path=str(tmp_path / "gray.npz")))
  assert len(src) == 3 and src[2].shape == (4, 4, 1) and src[2].dtype == np.uint8
  np.testing.assert_array_equal(src[2][..., 0], images[2])
  rgb = ip.make_source(data_config(path=str(tmp_path / "gray.npz"), channels=3))
  np.testing.assert_array_equal(rgb[1], np.repeat(images[1][..., None], 3, axis=-1))


def test_folder_source_resizes_crops_and_converts(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  wide = np.zeros((8, 16, 3), np.uint8)
  wide[:, 4:12] = (255, 0, 0)  # the centre square is red, the sides black
  Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
  tall = np.zeros((16, 8), np.uint8)
  tall[4:12] = 200  # the centre square is light, top and bottom black
  Image.fromarray(tall).save(tmp_path / "a" / "b" / "tall.jpg", quality=100)
  (tmp_path / "notes.txt").write_text("not an image")
  src = ip.make_source(data_config(source="folder", path=str(tmp_path), image_size=4, channels=3))
  assert len(src) == 2
  tall_rgb, red = src[0], src[1]  # sorted paths: a/b/tall.jpg, a/wide.png
  assert red.shape == (4, 4, 3) and red.dtype == np.uint8
  # The centre crop kept the red square (bicubic resampling may tint the border columns with the black sides).
  assert red[:, 1:3, 0].min() > 200 and red[:, 1:3, 1:].max() < 40
  assert tall_rgb.shape == (4, 4, 3) and np.all(tall_rgb[0] == tall_rgb[0, :, :1])  # gray → RGB by repetition
  assert np.all(np.abs(tall_rgb[1:3].astype(int) - 200) <= 8)  # the crop is the centre, not the black top
  one = ip.make_source(data_config(source="folder", path=str(tmp_path), image_size=4, channels=1))
  assert one[1].shape == (4, 4, 1)
  np.testing.assert_allclose(one[1][:, 1:3, 0], 76, atol=2)  # red → L with Pillow's weights (0.299·255)


def test_digits_source_is_sklearns_digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  src = ip.make_source(data_config(source="digits", image_size=16))
  assert len(src) == 1797 and src[0].shape == (16, 16, 1) and src[0].dtype == np.uint8
  assert src[0].max() > 200  # 0..16 was stretched to 0..255
  small = np.asarray(Image.fromarray(src[0][..., 0]).resize((8, 8), Image.BILINEAR), np.float64)
  digits = load_digits()
  assert digits.target[0] == 0
  assert np.corrcoef(small.ravel(), digits.images[0].ravel())[0, 1] > 0.9


@pytest.mark.parametrize("random_flip", [True, False])
def test_tfds_source_on_mock_cifar10(random_flip):
  tfds = pytest.importorskip("tensorflow_datasets")
  c = data_config(source="tfds", name="cifar10", image_size=32, channels=3, random_flip=random_flip)
  with tfds.testing.mock_data(num_examples=20):
    src = ip.make_source(c)
    assert len(src) == 20
    raw = [src[i] for i in range(20)]
    batch = next(ip.batches(c, seed=0, global_batch_size=20, start_step=0, num_local_devices=2, process_index=0,
                            process_count=1))
    gray = ip.make_source(data_config(source="tfds", name="cifar10", image_size=32, channels=1))[0]
  assert batch.shape == (2, 10, 32, 32, 3) and batch.dtype == np.float32
  assert batch.min() >= -1 and batch.max() <= 1
  np.testing.assert_allclose((batch + 1) * 127.5, np.round((batch + 1) * 127.5), atol=1e-3)  # on the uint8 grid
  as_uint8 = np.round((batch + 1) * 127.5).astype(np.uint8).reshape(20, 32, 32, 3)
  plain = sum(any(np.array_equal(b, r) for r in raw) for b in as_uint8)
  mirrored = sum(any(np.array_equal(b, r[:, ::-1]) for r in raw) for b in as_uint8)
  assert plain + mirrored == 20  # every example is a source image, as is or mirrored (random images: not both)
  assert (plain > 0 and mirrored > 0) if random_flip else mirrored == 0
  expected_gray = np.asarray(Image.fromarray(raw[0]).convert("L"))
  np.testing.assert_array_equal(gray[..., 0], expected_gray)  # RGB → L for channels=1


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A real array_record tfds data set built offline: 5 examples, 'gray' 6×8×1 filled with 40·i, 'rgba' 6×8×4,
  'label' 4 − i of 5 classes."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class DdpmTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"gray": tfds.features.Image(shape=(6, 8, 1)), "rgba": tfds.features.Image(shape=(6, 8, 4)),
           "label": tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        rgba = np.zeros((6, 8, 4), np.uint8)
        rgba[..., :3], rgba[..., 3] = (10 * i, 100, 200), 0  # fully transparent: alpha must be dropped, not used
        yield i, {"gray": np.full((6, 8, 1), 40 * i, np.uint8), "rgba": rgba, "label": 4 - i}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  DdpmTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


def test_tfds_source_on_a_prepared_data_set(tiny_tfds):
  c = data_config(source="tfds", name="ddpm_test_images", data_dir=tiny_tfds, image_key="gray", channels=3)
  src = ip.make_source(c)
  assert len(src) == 5
  images = np.stack([src[i] for i in range(5)])  # tfds stores examples in its own (hashed-key) order
  assert images.shape == (5, 4, 4, 3) and images.dtype == np.uint8  # 6×8 → resized and centre-cropped to 4×4
  fills = np.sort(images[:, 0, 0, 0]).astype(int)
  np.testing.assert_allclose(fills, 40 * np.arange(5), atol=1)
  assert np.all(np.abs(images.astype(int) - images[:, :1, :1, :1]) <= 1)  # flat, and gray → RGB by repetition
  assert len(ip.make_source(data_config(**{**c.to_dict(), "split": "train[:3]"}))) == 3  # tfds split slicing
  rgba = ip.make_source(data_config(**{**c.to_dict(), "image_key": "rgba"}))
  rgb = np.stack([rgba[i] for i in range(5)]).astype(int)
  assert rgb.shape == (5, 4, 4, 3)
  np.testing.assert_allclose(np.sort(rgb[:, 0, 0, 0]), 10 * np.arange(5), atol=1)
  assert np.all(np.abs(rgb[..., 1:] - (100, 200)) <= 1)
  _one_line_error(data_config(**{**c.to_dict(), "split": "validation"}), "has no split 'validation'.*'train'")
  _one_line_error(data_config(**{**c.to_dict(), "image_key": "image"}), "has no feature 'image'.*'gray'")


def _one_line_error(c, match, **kw):
  with pytest.raises(ValueError, match=match) as e:
    ip.create_dataset(c, seed=0, global_batch_size=kw.get("batch", 4), process_index=0,
                      process_count=kw.get("hosts", 1), num_classes=kw.get("num_classes", 0))
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
  np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 4, 4), np.uint8))
  _one_line_error(data_config(path=str(tmp_path / "empty.npz")), "has no examples")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  _one_line_error(data_config(path=str(tmp_path / "junk.npz")), "cannot read")
  _one_line_error(data_config(source="folder", path=str(tmp_path / "nodir")), "is not a directory")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no images here")
  _one_line_error(data_config(source="folder", path=str(tmp_path / "empty")), "holds no .png/.jpg/.jpeg")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG garbage")
  src = ip.make_source(data_config(source="folder", path=str(tmp_path / "bad")))
  with pytest.raises(ValueError, match="cannot decode image .*broken.png") as e:
    src[0]
  assert "\n" not in str(e.value)
  _one_line_error(data_config(path=indexed_npz), "training.batch_size = 4: not divisible by the 3 hosts", hosts=3)
  _one_line_error(data_config(channels=2, path=indexed_npz), "data.channels must be 1 or 3")
  with pytest.raises(ValueError, match="training.batch_size = 4: not divisible by the 3 devices") as e:
    ip.batches(data_config(path=indexed_npz), seed=0, global_batch_size=4, start_step=0, num_local_devices=3,
               process_index=0, process_count=1)  # raised by the call itself, not at the first next()
  assert "\n" not in str(e.value)


def test_tfds_errors_never_download(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  _one_line_error(data_config(source="tfds", name="no_such_dataset_xyz"), "unknown tfds data set")
  # mnist's code is registered but nothing is prepared in tmp_path: an error that says how, not a download.
  _one_line_error(data_config(source="tfds", name="mnist", data_dir=str(tmp_path)),
                  "is not prepared in .*run `tfds build mnist --data_dir=")


# ---------------------------------------------------------------------------------------------------------------
# Labels for class-conditional models: each source's own, in the same order as the images.

def _labelled(c, num_classes, steps=3, batch=4):
  """(images, labels) of the first steps×batch slots, labelled and unlabelled datasets side by side."""
  make = lambda n: ip.create_dataset(c, seed=3, global_batch_size=batch, process_index=0, process_count=1,
                                     num_classes=n)
  labelled, plain = make(num_classes), make(0)
  pairs = [labelled[s] for s in range(steps)]
  for s, (images, labels) in enumerate(pairs):
    np.testing.assert_array_equal(images, plain[s])  # labels change nothing about the images or their order
    assert labels.dtype == np.int32 and labels.shape == (batch,)
  return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def test_npz_labels_come_from_arr_1_in_the_images_order(indexed_npz, tmp_path):
  with np.load(indexed_npz) as f:
    images = f["arr_0"]
  path = str(tmp_path / "labelled.npz")
  np.savez(path, images, (np.arange(N) * 7) % 3)  # arr_0, arr_1
  got, labels = _labelled(data_config(path=path, random_flip=True), 3)
  np.testing.assert_array_equal(labels, (ids(got) * 7) % 3)
  _one_line_error(data_config(path=indexed_npz), "no 'arr_1' of labels.*np.savez", num_classes=3)
  _one_line_error(data_config(path=path), "labels run from 0 to 2 but model.num_classes is 2", num_classes=2)


def test_folder_labels_are_the_sorted_sub_folders(tmp_path):
  for name, value in (("cat", 30), ("ant", 10), ("bee", 20)):  # classes by name: ant 0, bee 1, cat 2
    (tmp_path / "data" / name).mkdir(parents=True)
    for j in range(2):
      Image.fromarray(np.full((4, 4), value, np.uint8)).save(tmp_path / "data" / name / f"{j}.png")
  folder = data_config(source="folder", path=str(tmp_path / "data"))
  got, labels = _labelled(folder, 3)
  np.testing.assert_array_equal(labels, np.round((got[:, 0, 0, 0] + 1) * 127.5 / 10).astype(int) - 1)
  _one_line_error(folder, "3 class sub-folders but model.num_classes is 4", num_classes=4)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "data" / "loose.png")
  _one_line_error(folder, "outside class sub-folders.*loose.png", num_classes=3)


def test_digits_labels_are_the_digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  src = ip.make_source(data_config(source="digits", image_size=8), num_classes=10)
  for i in (0, 1, 500, 1796):
    image, label = src[i]
    assert label == digits.target[i]
    np.testing.assert_array_equal(image[..., 0], np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8))


def test_tfds_labels_come_from_the_label_feature(tiny_tfds):
  c = data_config(source="tfds", name="ddpm_test_images", data_dir=tiny_tfds, image_key="gray", label_key="label")
  got, labels = _labelled(c, 5, steps=2, batch=5)
  np.testing.assert_array_equal(labels, 4 - np.round((got[:, 0, 0, 0] + 1) * 127.5 / 40).astype(int))
  _one_line_error(c, "has 5 classes in 'label' but model.num_classes is 3; set model.num_classes=5", num_classes=3)
  _one_line_error(data_config(**{**c.to_dict(), "label_key": "class"}), "no feature 'class'.*set data.label_key",
                  num_classes=5)
