"""Images in and out: [-1, 1] floats ↔ uint8, grids of samples, PNG files."""
import io
import math

import numpy as np
from PIL import Image

from ddpm_jax import fileio


def to_uint8(x):
  """[-1, 1] floats → uint8 in [0, 255], rounded like the authors' (x + 1) · 127.5."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, ncols=None, pad=1):
  """uint8 [N, H, W, C] → one uint8 [rows·(H+pad)+pad, cols·(W+pad)+pad, C] image, row-major, white padding."""
  n, h, w, c = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid


def save_png(path, image, upscale=1):
  """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG, optionally enlarged with nearest-neighbour pixels."""
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  fileio.write_bytes(path, buf.getvalue())  # local, gs:// or ram://


def image_shape(data_config):
  """(H, W, C) of the images config.data describes: what the model sees and the samples are."""
  return (data_config.image_size, data_config.image_size, data_config.channels)
