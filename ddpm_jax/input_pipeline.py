"""Training images from tfds, a folder, an .npz array or scikit-learn's digits, in a deterministic order.

A class-conditional model (num_classes > 0) also reads each image's label: tfds' data.label_key feature, the
sub-folder of data.path an image sits in (sub-folders sorted by name are classes 0, 1, …), an .npz's arr_1, or the
digit. The example is then (image, label) and a batch (images, labels); the order below is the same either way.

The global batch at step s is a pure function of (seed, s, global batch size, data set): global slot g = s·B + j
reads example perm_e(g mod N) of epoch e = g div N (grain's index shuffle, reseeded per epoch), flipped or not by a
coin keyed on (seed, g). Host h of P reads slots j ∈ [h·B/P, (h+1)·B/P). So a resumed run, or a run on another
number of hosts, sees exactly the batches of an uninterrupted one. The seed is hashed first: grain reseeds epoch e
with shuffle_seed + e, so raw seeds 0 and 1 would otherwise share their epoch orders, shifted by one epoch.
"""
import glob
import os

import grain
import numpy as np
from PIL import Image

from ddpm_jax import devices
from ddpm_jax import errors
from ddpm_jax import tensorflow_cpu

SOURCES = ("tfds", "folder", "npz", "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _fit(image, size, channels, name):
  """uint8 [H, W, C] (or [H, W]) → uint8 [size, size, channels]: convert channels, resize short side, centre-crop."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{name} has dtype {image.dtype}, not uint8; store images as uint8 0-255.")
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 4:  # alpha carries no image content here
    image = image[..., :3]
  if image.shape[-1] != channels:
    if image.shape[-1] == 1:
      image = np.repeat(image, channels, axis=-1)
    else:  # RGB → L with Pillow's weights
      image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  scale = size / min(h, w)
  pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
  left, top = (pil.width - size) // 2, (pil.height - size) // 2
  out = np.asarray(pil.crop((left, top, left + size, top + size)))
  return out[..., None] if channels == 1 else out


def _checked_labels(labels, num_classes, where):
  """labels as int32 [N], or a one-line error if any lies outside 0 … num_classes − 1."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integers of shape [N], got {labels.dtype} of shape {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{where}: labels run from {labels.min()} to {labels.max()} but model.num_classes is "
                     f"{num_classes}; set model.num_classes to the number of classes.")
  return labels.astype(np.int32)


class _ArraySource:
  """Random access over a uint8 [N, H, W, C] array already at the configured size (and its labels, if given)."""

  def __init__(self, array, labels=None):
    self.array, self.labels = array, labels

  def __len__(self):
    return len(self.array)

  def __getitem__(self, i):
    return self.array[i] if self.labels is None else (self.array[i], self.labels[i])


class _FolderSource:
  """Image files decoded with Pillow on access, converted, resized and centre-cropped (with labels, if given)."""

  def __init__(self, paths, size, channels, labels=None):
    self.paths, self.size, self.channels, self.labels = paths, size, channels, labels

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    image = self._image(i)
    return image if self.labels is None else (image, self.labels[i])

  def _image(self, i):
    path = self.paths[i]
    try:
      with Image.open(path) as img:
        img = img.convert("L" if self.channels == 1 else "RGB")
        arr = np.asarray(img)
    except (OSError, SyntaxError) as e:  # Pillow's plugins raise SyntaxError for some malformed headers
      raise ValueError(f"cannot decode image {path} ({errors.first_line(e)}); delete or replace the file.") from None
    return _fit(arr, self.size, self.channels, path)


class _TfdsSource:
  """A prepared tfds data set read through tfds.data_source (array_record, random access)."""

  def __init__(self, source, image_key, size, channels, name, label_key=None):
    self.source, self.image_key, self.size, self.channels, self.name = source, image_key, size, channels, name
    self.label_key = label_key

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    example = self.source[i]
    image = _fit(example[self.image_key], self.size, self.channels, f"{self.name} example {i}")
    return image if self.label_key is None else (image, np.int32(example[self.label_key]))


def _digits(size):
  """(uint8 [1797, size, size, 1] images, int [1797] digits) of scikit-learn's load_digits."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top  # only this source needs sklearn
  digits = load_digits()
  raw = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], values 0..16
  resized = [np.asarray(Image.fromarray(d).resize((size, size), Image.BILINEAR)) for d in raw]
  return np.stack(resized)[..., None], digits.target


def _folder_labels(root, paths, num_classes):
  """The class of each path: the index of its first sub-folder of root, sub-folders sorted by name."""
  parts = [os.path.relpath(p, root).split(os.sep) for p in paths]
  loose = [p for p in parts if len(p) < 2]
  if loose:
    raise ValueError(f"data.path {root!r} holds images outside class sub-folders (e.g. {loose[0][0]}); a conditional "
                     "model needs one sub-folder per class (data.path/<class>/*.png).")
  classes = sorted({p[0] for p in parts})
  if len(classes) != num_classes:
    raise ValueError(f"data.path {root!r} has {len(classes)} class sub-folders but model.num_classes is {num_classes}; "
                     "set model.num_classes to match.")
  index = {name: i for i, name in enumerate(classes)}
  return np.array([index[p[0]] for p in parts], np.int32)


def _npz(path, size, channels, num_classes=0):
  """(uint8 [N, size, size, channels] images from arr_0, int32 labels from arr_1 or None), in one read of the file."""
  if not os.path.isfile(path):
    raise ValueError(f"data.path {path!r} is not a file; point it at an .npz holding arr_0 (uint8 NHWC).")
  try:
    f = np.load(path, allow_pickle=False)  # never unpickles: a pickle or other file raises ValueError
  except (OSError, EOFError, ValueError) as e:
    raise ValueError(f"cannot read {path} as .npz ({errors.first_line(e)}); write it with np.savez.") from None
  if not isinstance(f, np.lib.npyio.NpzFile) or "arr_0" not in f.files:
    found = f.files if isinstance(f, np.lib.npyio.NpzFile) else "a single .npy array"
    raise ValueError(f"{path} has no 'arr_0' (it has {found}); save the images with np.savez(path, images).")
  with f:
    array = f["arr_0"]
    labels = f["arr_1"] if num_classes and "arr_1" in f.files else None
  if array.dtype != np.uint8 or array.ndim not in (3, 4):
    raise ValueError(f"{path}: arr_0 is {array.dtype} of shape {array.shape}; it must be uint8 [N, H, W(, C)].")
  if array.ndim == 3:
    array = array[..., None]
  if array.shape[1:3] != (size, size) or array.shape[3] not in (1, 3):
    raise ValueError(f"{path}: images are {array.shape[1:]}, not {size}×{size}×{channels}; set data.image_size "
                     "and data.channels to match, or resize the array.")
  if array.shape[3] != channels:
    array = np.stack([_fit(a, size, channels, path) for a in array])
  if not num_classes:
    return array, None
  if labels is None:
    raise ValueError(f"{path} has no 'arr_1' of labels, which model.num_classes > 0 needs; save them with "
                     "np.savez(path, images, labels).")
  return array, _checked_labels(labels, num_classes, f"{path} arr_1")


def _tfds(c, num_classes=0):
  tensorflow_cpu.load()  # tfds decodes with TensorFlow: keep it off the GPUs
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy; only this source needs it
  data_dir = c.data_dir or None
  try:
    builder = tfds.builder(c.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown tfds data set {c.name!r}; check data.name against `tfds list` "
                     "(e.g. cifar10, celeb_a_hq/256, lsun/church_outdoor).") from None
  for key, field in ((c.image_key, "image_key"),) + (((c.label_key, "label_key"),) if num_classes else ()):
    if key not in builder.info.features:
      raise ValueError(f"tfds data set {c.name!r} has no feature {key!r}; set data.{field} to one of "
                       f"{sorted(builder.info.features)}.")
  known = getattr(builder.info.features[c.label_key], "num_classes", None) if num_classes else None
  if known is not None and known != num_classes:
    raise ValueError(f"tfds data set {c.name!r} has {known} classes in {c.label_key!r} but model.num_classes is "
                     f"{num_classes}; set model.num_classes={known}.")
  try:  # download=False: a missing data set is an error here, never a download
    source = tfds.data_source(c.name, split=c.split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except  # tfds raises several types; say what to do instead
    if not builder.is_prepared():
      raise ValueError(f"tfds data set {c.name!r} is not prepared in {builder.data_dir}; run `tfds build {c.name} "
                       f"--data_dir=DIR` (or download_and_prepare) first, then set data.data_dir=DIR.") from None
    if c.split not in builder.info.splits:
      raise ValueError(f"tfds data set {c.name!r} has no split {c.split!r}; set data.split to one of "
                       f"{sorted(builder.info.splits)}.") from None
    raise ValueError(f"cannot open tfds data set {c.name!r} split {c.split!r} in {builder.data_dir} "
                     f"({errors.first_line(e)}); if it is not array_record, rebuild it with "
                     f"`tfds build {c.name} --file_format=array_record`.") from None
  return _TfdsSource(source, c.image_key, c.image_size, c.channels, c.name, c.label_key if num_classes else None)


def make_source(data_config, num_classes=0):
  """Random-access source of uint8 [H, W, C] images at data.image_size × data.image_size × data.channels; with
  num_classes > 0 (a conditional model), of (image, int32 label) pairs."""
  c = data_config
  if c.source not in SOURCES:
    raise ValueError(f"unknown data.source {c.source!r}; choose one of {SOURCES}.")
  if c.channels not in (1, 3):
    raise ValueError(f"data.channels must be 1 or 3, got {c.channels}.")
  if c.source == "digits":
    images, digits = _digits(c.image_size)
    return _ArraySource(images, _checked_labels(digits, num_classes, "digits") if num_classes else None)
  if c.source == "npz":
    return _ArraySource(*_npz(c.path, c.image_size, c.channels, num_classes))
  if c.source == "folder":
    if not os.path.isdir(c.path):
      raise ValueError(f"data.path {c.path!r} is not a directory; point it at a folder of PNG/JPEG images.")
    paths = sorted(p for p in glob.glob(os.path.join(c.path, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))
    if not paths:
      raise ValueError(f"data.path {c.path!r} holds no .png/.jpg/.jpeg files (searched recursively).")
    return _FolderSource(paths, c.image_size, c.channels,
                         _folder_labels(c.path, paths, num_classes) if num_classes else None)
  return _tfds(c, num_classes)


def _maybe_flip(image, rng):
  return image[:, ::-1] if rng.random() < 0.5 else image


def _image_to_float(example):
  """uint8 image → float32 in [-1, 1]; a label passes through."""
  if isinstance(example, tuple):
    return _image_to_float(example[0]), example[1]
  return example.astype(np.float32) / 127.5 - 1.0


def _flip_image(example, rng):
  if isinstance(example, tuple):
    return _maybe_flip(example[0], rng), example[1]
  return _maybe_flip(example, rng)


def create_dataset(data_config, *, seed, global_batch_size, process_index, process_count, source=None, num_classes=0):
  """grain.MapDataset whose element s is this host's batch of step s: float32 [B/P, H, W, C] in [-1, 1] (with
  num_classes > 0, a tuple with the int32 labels [B/P])."""
  devices.check_divisible("training.batch_size", global_batch_size, process_count, "hosts")
  source = make_source(data_config, num_classes) if source is None else source
  if len(source) == 0:
    where = data_config.name if data_config.source == "tfds" else data_config.path
    raise ValueError(f"data.source {data_config.source!r} ({where}) has no examples; point it at a non-empty data set.")
  shuffle_seed, flip_seed = (int(x) for x in np.random.SeedSequence(seed).generate_state(2))
  # repeat() passes the global slot g through; shuffle reseeds each epoch g // N itself: a pure function of g.
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  if data_config.random_flip:
    ds = ds.random_map(_flip_image, seed=flip_seed)  # Philox keyed on (flip_seed, g), not on host or history
  ds = ds.batch(global_batch_size // process_count)[process_index::process_count]
  return ds.map(_image_to_float)


def batches(data_config, *, seed, global_batch_size, start_step, num_local_devices, process_index=None,
            process_count=None, num_threads=2, num_classes=0):
  """This host's batches for steps start_step, start_step + 1, …, each [devices, per_device, H, W, C] (with
  num_classes > 0, a tuple with the labels [devices, per_device]).

  Not a generator function, so a bad config or data set raises here rather than at the first next().
  """
  import jax  # pylint: disable=g-import-not-at-top  # keep this module importable without initialising JAX
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  devices.check_divisible("training.batch_size", global_batch_size, process_count * num_local_devices)
  ds = create_dataset(data_config, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, num_classes=num_classes)
  it = ds[start_step:].to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
  per_device = lambda x: x.reshape((num_local_devices, -1) + x.shape[1:])
  return (tuple(map(per_device, batch)) if isinstance(batch, tuple) else per_device(batch) for batch in it)
