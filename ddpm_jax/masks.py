"""Inpainting masks, float32 [N, H, W, 1] with 1 = known pixel (kept) and 0 = pixel to generate.

Named masks ('half', 'center', 'random') or masks read from an .npz or a folder of PNGs. A random mask depends only
on (seed, image index), so image i gets the same mask however many images are asked for.
"""
import os
import zipfile

import numpy as np
from PIL import Image

from ddpm_jax import errors

NAMES = ("half", "center", "random")


def named(name, num, height, width, seed=0):
  """num masks [num, H, W, 1]: 'half' keeps the top half rows, 'center' hides a centred (H/2)×(W/2) box, 'random'
  hides random rectangles per image until at least half the pixels are hidden."""
  if name == "half":
    mask = np.zeros((height, width), np.float32)
    mask[:height // 2] = 1.0
    return np.broadcast_to(mask[None, :, :, None], (num, height, width, 1)).copy()
  if name == "center":
    mask = np.ones((height, width), np.float32)
    h, w = height // 2, width // 2
    top, left = (height - h) // 2, (width - w) // 2
    mask[top:top + h, left:left + w] = 0.0
    return np.broadcast_to(mask[None, :, :, None], (num, height, width, 1)).copy()
  if name == "random":
    return np.stack([_random_mask(height, width, seed, i) for i in range(num)])[..., None]
  raise ValueError(f"Unknown mask {name!r}; choose one of {NAMES} or give an .npz file or a folder of PNGs.")


def _random_mask(height, width, seed, index):
  """[H, W] float32: rectangles of 1/8 to 1/3 of each side hidden until ≥ half the pixels are (≤ ~61%)."""
  rng = np.random.default_rng([seed, index])
  mask = np.ones((height, width), np.float32)
  while mask.mean() > 0.5:
    h = rng.integers(max(1, height // 8), max(1, height // 3) + 1)
    w = rng.integers(max(1, width // 8), max(1, width // 3) + 1)
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    mask[top:top + h, left:left + w] = 0.0
  return mask


def load(path, num, height, width):
  """num masks [num, H, W, 1] from an .npz (arr_0: uint8 or bool [N, H, W(, 1)], 0/1 or 0/255) or a folder of PNGs
  (sorted by name; grey ≥ 128 = known). One mask serves every image; of more than num, the first num are used.
  Masks of another size are resized with nearest-neighbour pixels."""
  path = os.fspath(path)
  if os.path.isdir(path):
    masks = _from_pngs(path, num)
  elif os.path.isfile(path):
    masks = _from_npz(path)
  else:
    raise ValueError(f"mask {path!r} is neither a file nor a folder; give an .npz of masks or a folder of PNGs.")
  if len(masks) != 1 and len(masks) < num:
    raise ValueError(f"{path} holds {len(masks)} masks for {num} images; give one mask (shared) or at least {num}.")
  masks = masks[:num] if len(masks) > 1 else np.repeat(masks, num, axis=0)
  return np.stack([_resized(m, height, width) for m in masks]).astype(np.float32)[..., None]


def _from_npz(path):
  """bool [N, H, W] from an .npz's arr_0."""
  try:
    loaded = np.load(path, allow_pickle=False)  # never unpickles: a pickle raises ValueError
    if not hasattr(loaded, "files"):
      raise ValueError("an .npy array, not an .npz archive")
    with loaded:
      array = loaded["arr_0"] if "arr_0" in loaded.files else loaded.files
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"cannot read {path} as .npz ({errors.first_line(e)}); write it with np.savez(path, masks).") from None
  if isinstance(array, list):
    raise ValueError(f"{path} has no 'arr_0' (it has {array}); save the masks with np.savez(path, masks).")
  if array.ndim == 4 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype not in (np.uint8, np.bool_) or array.ndim != 3:
    raise ValueError(f"{path}: arr_0 is {array.dtype} of shape {array.shape}; masks must be uint8 or bool "
                     "[N, H, W] or [N, H, W, 1].")
  values = set(np.unique(array).tolist())
  if array.dtype == np.uint8 and not (values <= {0, 1} or values <= {0, 255}):
    raise ValueError(f"{path}: mask values are {sorted(values)[:6]}; use 0/1 or 0/255 (1 or 255 = known pixel).")
  return array >= (128 if array.dtype == np.uint8 and 255 in values else 1)


def _from_pngs(path, num):
  """bool [N, H, W] from the first num PNGs of a folder (all of them if it holds just one)."""
  files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
  if not files:
    raise ValueError(f"mask folder {path} holds no .png files; put one mask PNG per image there (white = known).")
  masks = []
  for name in files[:num]:
    try:
      with Image.open(os.path.join(path, name)) as image:
        masks.append(np.asarray(image.convert("L")) >= 128)
    except (OSError, SyntaxError) as e:  # Pillow's plugins raise SyntaxError for some malformed headers
      raise ValueError(f"cannot decode mask {os.path.join(path, name)} ({errors.first_line(e)}); replace the file.") from None
  if len({m.shape for m in masks}) > 1:
    raise ValueError(f"the PNGs in {path} have different sizes ({sorted({m.shape for m in masks})}); use one size.")
  return np.stack(masks)


def _resized(mask, height, width):
  """bool [H, W] → bool [height, width], nearest-neighbour."""
  if mask.shape == (height, width):
    return mask
  image = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
  return np.asarray(image) >= 128


def from_spec(spec, num, height, width, seed=0):
  """num masks [num, H, W, 1] for spec: one of NAMES, or a path for `load`."""
  if spec in NAMES:
    return named(spec, num, height, width, seed)
  if not os.path.exists(os.fspath(spec)):
    raise ValueError(f"Unknown mask {spec!r}: not one of {NAMES} and no such file or folder; give a name, an .npz "
                     "or a folder of PNGs.")
  return load(spec, num, height, width)
