"""The DDPM U-Net (Ho et al. 2020, Appendix B), module for module as in the authors' TF code.

Submodules carry the original TF scope names (`temb/dense0`, `down_1/block_0/conv1`, `mid/attn_1/q`,
`up_3/upsample/conv`, `norm_out`, …) and leaves map W→kernel, b→bias, gamma→scale, beta→bias, so released
checkpoints load one-to-one. Tensors are NHWC; conv kernels HWIO; dense/1×1 kernels [in, out].
"""
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import conv3x3


def _init(scale=1.0):
  # TF's variance_scaling(scale, 'fan_avg', 'uniform'), as the authors' default_init; 1e-10 stands in for zero.
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def _conv(features, name, *, stride=1, kernel=3, init_scale=1.0, dtype=jnp.float32, conv_impl="xla"):
  # 'SAME' is TF's rule: a stride-2 conv on an even size pads 0 before and 1 after, as the original.
  # conv_impl 'auto' on the CPU backend: a 3×3 stride-1 conv whose gradients take the form XLA:CPU runs fastest at
  # the shape (models/conv3x3.py), plugged into nn.Conv so that the module and its params stay the same.
  custom = kernel == 3 and stride == 1 and conv3x3.use_custom(conv_impl)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", kernel_init=_init(init_scale),
                 dtype=dtype, name=name, conv_general_dilated_cls=conv3x3.Conv3x3 if custom else None)


def _dense(features, name, *, init_scale=1.0, dtype=jnp.float32):
  return nn.Dense(features, kernel_init=_init(init_scale), dtype=dtype, name=name)


def _norm(name, dtype=jnp.float32):
  # Two-pass variance (use_fast_variance=False) to match TF/PyTorch numerics.
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def timestep_embedding(t, dim):
  """Sinusoidal embedding of integer timesteps t [B] → [B, dim]: [sin(t·f_i), cos(t·f_i)], f_i = 10000^(−i/(h−1))."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbed(nn.Module):
  """temb: sinusoidal(ch) → dense(4ch) → swish → dense(4ch)."""
  ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    temb = timestep_embedding(t, self.ch)
    temb = _dense(4 * self.ch, "dense0", dtype=self.dtype)(temb)
    return _dense(4 * self.ch, "dense1", dtype=self.dtype)(nn.swish(temb))


class ResnetBlock(nn.Module):
  """GroupNorm → swish → conv → +temb → GroupNorm → swish → dropout → conv, plus a (1×1 when needed) shortcut."""
  out_ch: int
  dropout: float
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, temb, train):
    h = _conv(self.out_ch, "conv1", dtype=self.dtype, conv_impl=self.conv_impl)(nn.swish(_norm("norm1", self.dtype)(x)))
    h = h + _dense(self.out_ch, "temb_proj", dtype=self.dtype)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(_norm("norm2", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, "conv2", init_scale=1e-10, dtype=self.dtype, conv_impl=self.conv_impl)(h)
    if x.shape[-1] != self.out_ch:
      x = _dense(self.out_ch, "nin_shortcut", dtype=self.dtype)(x)
    return x + h


def _resnet_block(remat):
  """ResnetBlock, or a rematerialised one (activations recomputed in the backward pass; same param names).

  `train` (argument 3, counting self) is static: it switches dropout on and off in Python.
  """
  return nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, with a residual connection."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _norm("norm", self.dtype)(x)
    q, k, v = (_dense(c, n, dtype=self.dtype)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5), axis=-1)
    h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hgt, wid, c)
    return x + _dense(c, "proj_out", init_scale=1e-10, dtype=self.dtype)(h)


class Downsample(nn.Module):
  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return _conv(x.shape[-1], "conv", stride=2, dtype=self.dtype)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  with_conv: bool
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)  # nearest ×2
    return _conv(c, "conv", dtype=self.dtype, conv_impl=self.conv_impl)(x) if self.with_conv else x


class DownLevel(nn.Module):
  """One resolution level of the down path: res blocks (+ attention), then an optional downsample.

  Returns the outputs to keep as skip connections, in order.
  """
  out_ch: int
  num_res_blocks: int
  attn: bool
  downsample: bool
  dropout: float
  resamp_with_conv: bool
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, h, temb, train):
    skips = []
    for i in range(self.num_res_blocks):
      h = _resnet_block(self.remat)(self.out_ch, self.dropout, self.dtype, self.conv_impl,
                                    name=f"block_{i}")(h, temb, train)
      if self.attn:
        h = AttnBlock(self.dtype, name=f"attn_{i}")(h)
      skips.append(h)
    if self.downsample:
      skips.append(Downsample(self.resamp_with_conv, self.dtype, name="downsample")(h))
    return skips


class UpLevel(nn.Module):
  """One level of the up path: num_res_blocks + 1 res blocks on concatenated skips (+ attention after each)."""
  out_ch: int
  num_res_blocks: int
  attn: bool
  upsample: bool
  dropout: float
  resamp_with_conv: bool
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, h, skips, temb, train):
    """skips: this level's num_res_blocks + 1 skip connections, consumed last first."""
    for i in range(self.num_res_blocks + 1):
      h = jnp.concatenate([h, skips[-1 - i]], axis=-1)
      h = _resnet_block(self.remat)(self.out_ch, self.dropout, self.dtype, self.conv_impl,
                                    name=f"block_{i}")(h, temb, train)
      if self.attn:
        h = AttnBlock(self.dtype, name=f"attn_{i}")(h)
    if self.upsample:
      h = Upsample(self.resamp_with_conv, self.dtype, self.conv_impl, name="upsample")(h)
    return h


class MidBlock(nn.Module):
  out_ch: int
  dropout: float
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, h, temb, train):
    block = _resnet_block(self.remat)
    h = block(self.out_ch, self.dropout, self.dtype, self.conv_impl, name="block_1")(h, temb, train)
    h = AttnBlock(self.dtype, name="attn_1")(h)
    return block(self.out_ch, self.dropout, self.dtype, self.conv_impl, name="block_2")(h, temb, train)


class UNet(nn.Module):
  """ε_θ(x_t, t): the paper's U-Net. `apply(variables, x_NHWC, t_B, train=False)`; dropout rng named 'dropout'.

  Works for any square or rectangular input whose sides are divisible by 2^(len(ch_mult) − 1) and any number
  of input channels; out_ch is 2× the data channels for learned variances.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  out_ch: int = 3
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32  # activations (bfloat16 halves activation memory); params stay float32, output float32
  remat: bool = False  # recompute each ResnetBlock's activations in the backward pass: less memory, more compute
  # 'auto': on the CPU backend the 3×3 stride-1 convs' gradients take the form fastest for their shape
  # (models/conv3x3.py), XLA's convolution everywhere else; 'xla': XLA's convolution everywhere. Same params.
  conv_impl: str = "auto"
  # Class conditioning (not in the paper; 0 = off, the paper's exact model): a learned embedding of the label, one of
  # num_classes + 1 with the last the "null" label of classifier-free guidance, added to the timestep embedding.
  num_classes: int = 0
  # The share of training labels replaced by the null label (train_step.paper_loss draws it per example); it lets the
  # one network also predict unconditionally, which guided sampling needs (Ho & Salimans 2021).
  class_dropout: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if not self.ch_mult or self.num_res_blocks < 1:
      raise ValueError("model.ch_mult must be non-empty and model.num_res_blocks >= 1.")
    if self.num_classes < 0 or not 0 <= self.class_dropout < 1:
      raise ValueError("model.num_classes must be >= 0 (0 = unconditional) and model.class_dropout in [0, 1).")
    conv3x3.check_impl(self.conv_impl)
    bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
    if bad:
      raise ValueError(f"model.ch × ch_mult gives {bad} channels, not divisible by GroupNorm's 32 groups; "
                       "use a multiple of 32 for model.ch.")

  def resolutions(self, image_size):
    """Feature-map sizes visited by the down path for an input of side image_size."""
    return [image_size // 2**level for level in range(len(self.ch_mult))]

  def check_image_size(self, image_size):
    """Raises a one-line ValueError if this U-Net cannot take images of side image_size."""
    levels = len(self.ch_mult)
    if image_size <= 0 or image_size % 2 ** (levels - 1):
      raise ValueError(f"image size {image_size} is not divisible by 2^{levels - 1} = {2 ** (levels - 1)}, which "
                       f"model.ch_mult of {levels} levels needs; change data.image_size or model.ch_mult.")
    unused = sorted(set(self.attn_resolutions) - set(self.resolutions(image_size)))
    if unused:
      raise ValueError(f"model.attn_resolutions {unused} never occur for image size {image_size} (the U-Net visits "
                       f"{self.resolutions(image_size)}); pick attn_resolutions from those.")

  @property
  def null_label(self):
    """The label that asks for an unconditional prediction (the learned "null" class)."""
    return self.num_classes

  @nn.compact
  def __call__(self, x, t, train=False, labels=None):
    """labels: int [B] in [0, num_classes] (num_classes = null) for a conditional model; None = all null."""
    self.check_image_size(x.shape[1])
    if x.shape[2] % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(f"image width {x.shape[2]} is not divisible by 2^{len(self.ch_mult) - 1}.")
    if t.shape != (x.shape[0],):
      raise ValueError(f"t must have shape [batch] = ({x.shape[0]},), got {t.shape}.")
    levels = len(self.ch_mult)
    common = dict(dropout=self.dropout, resamp_with_conv=self.resamp_with_conv, dtype=self.dtype, remat=self.remat,
                  conv_impl=self.conv_impl)
    temb = TimestepEmbed(self.ch, self.dtype, name="temb")(t)
    if self.num_classes:
      if labels is None:
        labels = jnp.full(t.shape, self.null_label, jnp.int32)
      if labels.shape != t.shape:
        raise ValueError(f"labels must have shape [batch] = {t.shape}, got {labels.shape}.")
      # As diffusers' UNet2DModel(num_class_embeds=num_classes + 1): after the timestep MLP, before each block's swish.
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype, name="label_emb")(labels)
    elif labels is not None:
      raise ValueError("labels were given to an unconditional U-Net; set model.num_classes to train a conditional one.")

    skips = [_conv(self.ch, "conv_in", dtype=self.dtype, conv_impl=self.conv_impl)(x.astype(self.dtype))]
    for level, mult in enumerate(self.ch_mult):
      res = x.shape[1] // 2**level
      skips += DownLevel(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions,
                         downsample=level != levels - 1, name=f"down_{level}", **common)(skips[-1], temb, train)

    h = MidBlock(self.ch * self.ch_mult[-1], self.dropout, self.dtype, self.remat, self.conv_impl,
                 name="mid")(skips[-1], temb, train)

    for level in reversed(range(levels)):
      res = x.shape[1] // 2**level
      n = self.num_res_blocks + 1
      skips, level_skips = skips[:-n], skips[-n:]
      h = UpLevel(self.ch * self.ch_mult[level], self.num_res_blocks, res in self.attn_resolutions,
                  upsample=level != 0, name=f"up_{level}", **common)(h, level_skips, temb, train)

    h = nn.swish(_norm("norm_out", self.dtype)(h))
    return _conv(self.out_ch, "conv_out", init_scale=1e-10, dtype=self.dtype,
                 conv_impl=self.conv_impl)(h).astype(jnp.float32)


# The paper's two model sizes (docs/reference.md, Paper setup).
UNetCIFAR10 = functools.partial(UNet, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                dropout=0.1)
UNet256 = functools.partial(UNet, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                            dropout=0.0)
# A tiny U-Net for tests: every kind of block, 0.7M parameters.
UNetTiny = functools.partial(UNet, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
