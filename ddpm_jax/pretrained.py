"""Weights of other implementations in our U-Net: the diffusers `UNet2DModel` naming, read from safetensors.

Our parameter paths are the authors' TF scopes (`down_1/block_0/conv1/kernel`); `diffusers_key` gives the
diffusers name of each (`down_blocks.1.resnets.0.conv1.weight`; the up path is numbered from the bottom, so our
`up_l` is diffusers' `up_blocks.{L−1−l}`). Files are read with safetensors into NumPy: a pickle is never loaded.
`params_to_diffusers` goes the other way, so that our trained weights run in diffusers' pipelines and schedulers.
"""
import os

import flax
import numpy as np

from ddpm_jax import errors
from ddpm_jax import tensorflow_cpu

_BLOCK = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
          "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers < 0.20 names
_TOP = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _module(kind, index):
  if kind.startswith("block_"):
    return f"resnets.{index}"
  return f"attentions.{index}"


def diffusers_key(path, num_levels):
  """Our param path (tuple of names) → the diffusers UNet2DModel state-dict key."""
  *scopes, leaf = path
  leaf = "weight" if leaf in ("kernel", "scale", "embedding") else "bias"
  head = scopes[0]
  if head == "label_emb":  # the class-conditional U-Net's label table, [num_classes + 1, 4·ch] in both
    return f"class_embedding.{leaf}"
  if head in _TOP:
    return f"{_TOP[head]}.{leaf}"
  if head == "temb":
    return f"time_embedding.linear_{int(scopes[1][-1]) + 1}.{leaf}"
  if head == "mid":  # mid/block_1, mid/attn_1, mid/block_2
    block, layer = scopes[1], scopes[2]
    if block.startswith("attn"):
      return f"mid_block.attentions.0.{_ATTN[layer]}.{leaf}"
    return f"mid_block.resnets.{int(block[-1]) - 1}.{_BLOCK[layer]}.{leaf}"
  level = int(head.split("_")[1])
  prefix = f"down_blocks.{level}" if head.startswith("down") else f"up_blocks.{num_levels - 1 - level}"
  child, layer = scopes[1], scopes[2]
  if child in ("downsample", "upsample"):
    return f"{prefix}.{child}rs.0.conv.{leaf}"
  index = int(child.split("_")[1])
  table = _BLOCK if child.startswith("block") else _ATTN
  return f"{prefix}.{_module(child, index)}.{table[layer]}.{leaf}"


def _to_flax_layout(array, target_shape, key):
  """A torch tensor (OIHW conv, [out, in] linear, [out, in, 1, 1] 1×1 conv) in our layout (HWIO, [in, out]); an
  embedding table is [num, dim] in both."""
  if key.startswith("class_embedding."):
    return array
  if array.ndim == 4 and len(target_shape) == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 4:  # 1×1 conv shortcut stored as a conv in diffusers, a dense layer here
    return array[:, :, 0, 0].T
  if array.ndim == 2:
    return array.T
  return array


def params_from_diffusers(state, abstract_params, num_levels):
  """Our params tree from a diffusers state dict (name → NumPy array), shaped like abstract_params.

  Raises a one-line ValueError naming the first missing or mis-shaped tensor and the shape it should have.
  """
  keys = dict(state)
  for new, old in _LEGACY_ATTN.items():  # accept the pre-0.20 attention names too
    for k in list(keys):
      if f".{old}." in k:
        keys[k.replace(f".{old}.", f".{new}.")] = keys.pop(k)
  flat = {}
  for path, leaf in flax.traverse_util.flatten_dict(abstract_params).items():
    key = diffusers_key(path, num_levels)
    if key not in keys:
      raise ValueError(f"the checkpoint has no tensor {key!r} (our {'/'.join(path)}, shape {tuple(leaf.shape)}); "
                       "it is not a DDPM U-Net of this configuration.")
    # A contiguous copy: the source may be a live torch tensor's memory (a view would change with it).
    value = np.array(_to_flax_layout(np.asarray(keys.pop(key)), leaf.shape, key), dtype=np.float32, order="C")
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"tensor {key!r} has shape {value.shape} in our layout, expected {tuple(leaf.shape)} for "
                       f"{'/'.join(path)}; the checkpoint belongs to a U-Net of another size.")
    flat[path] = value
  if keys:
    raise ValueError(f"the checkpoint has {len(keys)} tensors our U-Net does not use, e.g. {sorted(keys)[0]!r}; "
                     "check the model configuration.")
  return flax.traverse_util.unflatten_dict(flat)


def _to_torch_layout(array, key):
  """Ours (HWIO conv, [in, out] dense) in torch's layout: the inverse of _to_flax_layout for the diffusers key."""
  if key.startswith("class_embedding."):
    return array
  if array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if array.ndim == 2 and ".conv_shortcut." in key:  # a dense layer here, a 1×1 conv in diffusers
    return array.T[:, :, None, None]
  if array.ndim == 2:
    return array.T
  return array


def params_to_diffusers(params, num_levels):
  """A diffusers UNet2DModel state dict (name → float32 NumPy array, torch layout) of our params tree.

  The inverse of params_from_diffusers: `UNet2DModel(**diffusers_unet_kwargs(…)).load_state_dict(
  {k: torch.from_numpy(v) for k, v in state.items()}, strict=True)` runs our trained weights in diffusers.
  """
  state = {}
  for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    key = diffusers_key(path, num_levels)
    if key in state:  # two of our tensors on one name: the mapping is not one-to-one for this tree
      raise ValueError(f"{'/'.join(path)} maps to {key!r}, which another tensor already took; is num_levels "
                       f"({num_levels}) the model's len(ch_mult)?")
    state[key] = np.array(_to_torch_layout(np.asarray(leaf, np.float32), key), dtype=np.float32, order="C")
  return state


def diffusers_unet_kwargs(ch, ch_mult, num_res_blocks, attn_resolutions, image_size, dropout=0.0, num_classes=0,
                          channels=3):
  """Keyword arguments for diffusers' `UNet2DModel` that build the paper's U-Net with these fields of config.model.

  Its weights map into ours with params_from_diffusers: the peer network of every side-by-side check, and the layout
  of a diffusers folder made from scratch. Needs no torch: it only names the settings. A class-conditional U-Net
  (num_classes > 0) is diffusers' num_class_embeds = num_classes + 1, the last label being our null label. channels:
  the image channels in and out (config.data.channels).
  """
  levels = range(len(ch_mult))
  attn = {l for l in levels if image_size // 2**l in attn_resolutions}
  return dict(
      sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=num_res_blocks,
      block_out_channels=tuple(ch * m for m in ch_mult),
      down_block_types=tuple("AttnDownBlock2D" if l in attn else "DownBlock2D" for l in levels),
      up_block_types=tuple("AttnUpBlock2D" if l in attn else "UpBlock2D" for l in reversed(levels)),
      downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
      attention_head_dim=None, act_fn="silu", dropout=dropout,
      num_class_embeds=num_classes + 1 if num_classes else None)


def read_safetensors(path):
  """name → NumPy array from a .safetensors file (or a diffusers folder holding one); pickles are refused."""
  if os.path.isdir(path):
    path = os.path.join(path, "diffusion_pytorch_model.safetensors")
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(f"{path} is a pickle, which is never loaded (it can run code); use the .safetensors file or "
                     "re-save it with diffusers: UNet2DModel.from_pretrained(DIR).save_pretrained(OUT).")
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found; pass a diffusion_pytorch_model.safetensors file or its folder.")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types
    raise ValueError(f"cannot read {path} as safetensors ({errors.first_line(e)}); the file may be truncated "
                     "or not a safetensors file.") from None


EMA_SUFFIX = "/ExponentialMovingAverage"


def read_tf_checkpoint(path, abstract_params, weights="ema"):
  """Our params tree from the authors' TF1 checkpoint (e.g. model.ckpt-790000), EMA shadows by default.

  Read with TensorFlow's checkpoint reader: tensors only, no graph, no pickle.
  """
  if weights not in ("ema", "raw"):
    raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
  tf = tensorflow_cpu.load()  # only this reader needs TensorFlow
  try:
    reader = tf.train.load_checkpoint(path)
  except Exception as e:  # pylint: disable=broad-except  # TF raises several error types for bad files
    raise ValueError(f"cannot read {path} as a TF checkpoint ({errors.first_line(e)}); pass the prefix "
                     "(…/model.ckpt-790000), not the .index or .data file.") from None
  available = reader.get_variable_to_shape_map()
  if weights == "ema" and not any(k.endswith(EMA_SUFFIX) for k in available):
    raise ValueError(f"{path} holds no EMA shadows (…{EMA_SUFFIX}); convert the raw weights with --weights=raw.")
  flat = {}
  for path_, leaf in flax.traverse_util.flatten_dict(abstract_params).items():
    is_norm = path_[-2].startswith("norm")  # norm1, norm2, norm, norm_out: GroupNorm's gamma/beta
    tf_leaf = {"kernel": "W", "bias": "beta" if is_norm else "b", "scale": "gamma"}[path_[-1]]
    name = "model/" + "/".join(path_[:-1] + (tf_leaf,)) + (EMA_SUFFIX if weights == "ema" else "")
    if name not in available:
      raise ValueError(f"the checkpoint has no tensor {name!r} (shape {tuple(leaf.shape)}); it is not a DDPM U-Net "
                       "of this configuration.")
    value = reader.get_tensor(name)
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(leaf.shape)}; the "
                       "checkpoint belongs to a U-Net of another size.")
    flat[path_] = np.asarray(value, np.float32)
  return flax.traverse_util.unflatten_dict(flat)
