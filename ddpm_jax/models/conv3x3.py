"""A 3×3 stride-1 'SAME' convolution (NHWC, HWIO) whose gradients are computed in the form fastest for the shape.

The forward pass is XLA's own convolution, so outputs are bit for bit those of `nn.Conv`, except on images of side
≤ 2, where one im2col matmul is 3× faster (`forward_form`; equal to 1e-6). In the backward pass the input gradient
and the weight gradient are each computed in one of three forms, picked by `choose` from the shape and the CPU:

- 'xla': the convolution's own vjp, as autodiff would compute it (two convolutions XLA lowers itself);
- 'winograd': Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016), tiles of 2×2 outputs from 4×4 inputs:
  transforms of the tiles, then 16 matmuls over the channels (one per point of the 4×4 transformed tile), then the
  inverse transform: 16 matmuls each contracting N·H·W/4, against 9 contracting N·H·W for the direct form;
- 'matmuls': nine matmuls, one per kernel tap, each over all N·H·W pixels of a shifted copy.

XLA:CPU runs the weight gradient of some shapes (large batch × image, its contracted dimension being the batch) far
below its matmul speed; on TPUs and GPUs XLA's convolutions are the vendors' kernels, so `use_custom` keeps this op
to the CPU backend. `Conv3x3` plugs it into `nn.Conv` (`conv_general_dilated_cls`), which keeps the module's params.
"""
import functools
import math

import jax
import jax.numpy as jnp

FORMS = ("xla", "winograd", "matmuls")
IMPLS = ("auto", "xla")  # model.conv_impl: 'auto' = this op on the CPU backend, XLA's convolution elsewhere
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def check_impl(conv_impl):
  """The one-line error for a model.conv_impl that is not one of IMPLS."""
  if conv_impl not in IMPLS:
    raise ValueError(f"model.conv_impl = {conv_impl!r}: unknown value; use one of {', '.join(map(repr, IMPLS))}.")


def use_custom(conv_impl):
  """Whether model.conv_impl asks for this op here: 'auto' on the CPU backend."""
  check_impl(conv_impl)
  return conv_impl == "auto" and jax.default_backend() == "cpu"


def choose(batch, side, cin, cout, winograd_weights=None):
  """(input-gradient form, weight-gradient form) for a batch of side×side images, cin → cout channels.

  winograd_weights: whether Winograd's weight gradient pays on this CPU at all (None: `winograd_pays_here()`).

  From benchmarks/bench_conv_impl.py (docs/performance.md has the tables), as XLA's time ÷ the form's (> 1: the form
  is faster):
  - Weight gradient. On the shared 2-core Intel Xeon, Winograd: 2.00 / 1.92 (two runs) at 8×32²×128→128, 1.78 / 2.24
    at 32×32²×128→128, 2.09 / 1.80 at 32×16²×256→256, 1.35 / 1.15 at 8×16²×256→256, 1.07 / 1.15 at 8×8²×256→256;
    less work loses or ties: 0.82 / 0.81 at 8×4²×256→256, and at the digits model's narrow channels 0.49 / 0.53 at
    64×8²×32→32, 0.83 / 0.88 at 64×4²×64→64. The CIFAR-10 train step was 1.21× / 1.24× faster at batch 8 / 32. The
    nine matmuls beat XLA only where Winograd beat them too. So: Winograd when both sides have ≥ 128 channels and the
    batch has ≥ 512 pixels (N·H·W), XLA's below. On two AMD EPYCs (AVX-512; families 25 and 26) XLA's own weight
    gradient ran 4–6× faster than on that (then loaded) Xeon, and Winograd lost at 32² (0.65–0.91) while winning at
    16² and 8² (1.19–1.59), yet the whole CIFAR-10 step gained nothing from it at batch 8 (0.98–1.00) and lost at
    batch 32 (0.87–0.96; without the 32² layers 0.98). So elsewhere than on Intel CPUs, XLA's weight gradient
    throughout.
  - Input gradient. XLA's own was the fastest or tied (≤ 1.10) at every shape but 2×2 images, where it took 2.1 ms at
    64×2²×64→64 against 0.4 for the nine matmuls (5.65 / 4.79) and 0.3 for Winograd (7.41 / 4.04: a tie within the
    noise, so the simpler form); 5.4 and 3.1 for the matmuls on the two EPYCs. Winograd's 1.33 and 1.13 at
    8×16²×256→256 and 8×8²×256→256 come from one run only (the earlier one, before a 6 ms kernel transpose was taken
    out of that form, had 0.78 and 0.34): not enough to leave XLA's there.
  """
  if winograd_weights is None:
    winograd_weights = winograd_pays_here()
  input_form = "matmuls" if side <= 2 else "xla"
  wide = min(cin, cout) >= 128 and batch * side * side >= 512
  return input_form, ("winograd" if winograd_weights and wide else "xla")


@functools.cache
def winograd_pays_here():
  """Whether this machine's CPU is of the kind Winograd's weight gradient was measured to pay on: Intel's (`choose`).
  Unmeasured kinds (ARM, other vendors) keep XLA's own, what autodiff computes."""
  return cpu_info("vendor_id") == "GenuineIntel"


def cpu_info(field):
  """A field of /proc/cpuinfo for the first CPU: 'vendor_id' ('GenuineIntel', 'AuthenticAMD', …), 'model name', …;
  '' where there is no such file or field."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.split(":", 1)[0].strip() == field:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


# ---------------------------------------------------------------------------------------------------------------
# The convolution and its gradients in each form. x [N, H, W, in], w [3, 3, in, out], g (the output's cotangent)
# [N, H, W, out]; every gradient comes back in the dtype of what it is the gradient of, as XLA's vjp returns it.

def xla_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DIMENSIONS)


def im2col_patches(x):
  """The nine shifted copies of x side by side, one row per pixel: [N·H·W, 9·in] in (i, j, in) order, as w's
  [3, 3, in, out] flattens to [9·in, out]."""
  n, h, wd, cin = x.shape
  xp = _pad_hw(x, 1, 1, 1)
  return jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], axis=-1).reshape(-1, 9 * cin)


def im2col_conv(x, w):
  """The convolution as one matmul, [N·H·W, 9·in] · [9·in, out]."""
  n, h, wd, cin = x.shape
  return jnp.dot(im2col_patches(x), w.reshape(9 * cin, -1)).reshape(n, h, wd, -1)


def forward_form(side):
  """'im2col' for images of side ≤ 2, else 'xla' (XLA's convolution).

  XLA:CPU's convolution is slow on 2×2 images, forward as backward (see `choose` for the input gradient): 1.11 ms at
  64×2²×64→64 against 0.34 ms as one im2col matmul (3.2×, medians of 15); from 4×4 up XLA's was faster (0.63 against
  1.29 ms at 64×8²×32→32, 0.68 against 1.08 at 64×4²×64→64, 12.1 against 28.8 at 8×32²×128→128).
  """
  return "im2col" if side <= 2 else "xla"


def _forward(x, w):
  n, h, wd, _ = x.shape
  return im2col_conv(x, w) if forward_form(math.isqrt(h * wd)) == "im2col" else xla_conv(x, w)


def input_grad_xla(x, w, g):
  return jax.vjp(lambda x: xla_conv(x, w), x)[1](g)[0]


def weight_grad_xla(x, w, g):
  return jax.vjp(lambda w: xla_conv(x, w), w)[1](g)[0]


def _pad_hw(a, before, after_h, after_w):
  return jnp.pad(a, ((0, 0), (before, after_h), (before, after_w), (0, 0)))


def _in_float32(grad, of):
  """grad(x, w, g) computed in float32 (or wider) and returned in the dtype of `of` ('x' or 'w'), as XLA returns it.

  For bfloat16 activations: XLA's own bfloat16 gradients accumulate in float32, and on XLA:CPU the Winograd weight
  gradient ran 1.4× faster with its transforms and matmuls in float32 than in bfloat16 (32×32²×128→128).
  """
  @functools.wraps(grad)
  def wrapped(x, w, g):
    wide = jnp.promote_types(x.dtype, jnp.float32)
    out = grad(x.astype(wide), w.astype(wide), g.astype(wide))
    return out.astype(dict(x=x, w=w)[of].dtype)
  return wrapped


def weight_grad_matmuls(x, w, g):
  """dW[i, j] = Σ_{n,h,w} x_pad[n, h + i, w + j]ᵀ g[n, h, w]: nine [in × N·H·W] · [N·H·W × out] matmuls."""
  h, wd, cin = x.shape[1:]
  xp = _pad_hw(x, 1, 1, 1)
  g2 = g.reshape(-1, g.shape[-1])
  taps = [[jnp.dot(xp[:, i:i + h, j:j + wd].reshape(-1, cin).T, g2) for j in range(3)] for i in range(3)]
  return jnp.stack([jnp.stack(row) for row in taps])


def input_grad_matmuls(x, w, g):
  """dx[p] = Σ_{i,j} g_pad[p + 2 − (i, j)] · w[i, j]ᵀ: nine [N·H·W × out] · [out × in] matmuls, shifted and summed."""
  h, wd = x.shape[1:3]
  gp = _pad_hw(g, 1, 1, 1)
  return sum(jnp.dot(gp[:, 2 - i:2 - i + h, 2 - j:2 - j + wd], w[i, j].T) for i in range(3) for j in range(3))


# Winograd F(2×2, 3×3) with Lavin & Gray's matrices, applied along one axis at a time as sums (no matmuls):
#   Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]   (4×4 input tile d → Bᵀ d B)
#   G  = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]                  (3×3 filter k → G k Gᵀ)
#   Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]                                (4×4 product m → Aᵀ m A, a 2×2 output tile)
# so that a 'VALID' correlation of a 4×4 tile with a 3×3 filter is Aᵀ [(G k Gᵀ) ⊙ (Bᵀ d B)] A. With channels, the ⊙
# becomes, at each of the 16 points, a matmul over the input channels. The weight gradient is that map's adjoint in k:
# dk = Gᵀ [Σ_tiles (Bᵀ d B) ⊙ (A dy Aᵀ)] G, the 16 matmuls contracting over the tiles instead.

def _phases(a, axis, n, k):
  """Along axis, the n slices a[2t + k] for t < n (a's length along axis is at least 2n + k)."""
  return jax.lax.slice_in_dim(a, k, k + 2 * n - 1, stride=2, axis=axis)


def _input_transform(dp, p, q):
  """Bᵀ d B of the p×q tiles d = dp[:, 2a:2a + 4, 2b:2b + 4] of dp [N, 2p + 2, 2q + 2, C] → [16, N·p·q, C]."""
  def along(a, axis, n):
    r = [_phases(a, axis, n, k) for k in range(4)]
    return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]
  v = [c for r in along(dp, 1, p) for c in along(r, 2, q)]
  return jnp.stack(v).reshape(16, -1, dp.shape[-1])


def _output_grad_transform(gp, p, q):
  """A dy Aᵀ of the 2×2 tiles dy = gp[:, 2a:2a + 2, 2b:2b + 2] of gp [N, 2p, 2q, C] → [16, N·p·q, C]."""
  def along(a, axis, n):
    y0, y1 = _phases(a, axis, n, 0), _phases(a, axis, n, 1)
    return [y0, y0 + y1, y0 - y1, -y1]
  m = [c for r in along(gp, 1, p) for c in along(r, 2, q)]
  return jnp.stack(m).reshape(16, -1, gp.shape[-1])


def _filter_transform(k):
  """G k Gᵀ of k [3, 3, I, O] → [16, I, O]."""
  def along(a):
    s = 0.5 * (a[0] + a[2])
    return [a[0], s + 0.5 * a[1], s - 0.5 * a[1], a[2]]
  rows = along(k)
  return jnp.stack([c for r in rows for c in along(r)]).reshape((16,) + k.shape[2:])


def _filter_grad_transform(u):
  """Gᵀ u G of u [4, 4, I, O] → [3, 3, I, O]."""
  def along(a):
    s = 0.5 * (a[1] + a[2])
    return [a[0] + s, 0.5 * (a[1] - a[2]), s + a[3]]
  return jnp.stack([jnp.stack(along(r)) for r in along(u)])


def _tiles(h, wd):
  return (h + 1) // 2, (wd + 1) // 2  # odd sides are padded to even: the extra row/column's gradient is zero


def _batched_dot(a, b, contract=(2, 1)):
  """[16, m, k] · [16, k, n] → [16, m, n]: the 16 matmuls of the Winograd domain, one batched dot."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))))


def weight_grad_winograd(x, w, g):
  h, wd = x.shape[1:3]
  p, q = _tiles(h, wd)
  xp = _pad_hw(x, 1, 2 * p - h + 1, 2 * q - wd + 1)  # [N, 2p + 2, 2q + 2, in]
  gp = _pad_hw(g, 0, 2 * p - h, 2 * q - wd)  # [N, 2p, 2q, out]
  v = _input_transform(xp, p, q)  # [16, T, in]
  m = _output_grad_transform(gp, p, q)  # [16, T, out]
  u = _batched_dot(v, m, contract=(1, 1))  # [16, in, out]: Σ over the tiles
  return _filter_grad_transform(u.reshape((4, 4) + u.shape[1:]))


def input_grad_winograd(x, w, g):
  """The input gradient is itself a 'SAME' 3×3 convolution: of g with w turned 180° and transposed, in Winograd form."""
  n, h, wd = x.shape[:3]
  p, q = _tiles(h, wd)
  gp = _pad_hw(g, 1, 2 * p - h + 1, 2 * q - wd + 1)  # [N, 2p + 2, 2q + 2, out]
  # Contracting w's out axis in the dot, not transposing w: the transpose of a 3×3×256×256 kernel alone took 6 ms.
  m = _batched_dot(_input_transform(gp, p, q), _filter_transform(w[::-1, ::-1]), contract=(2, 2))  # [16, T, in]
  m = m.reshape((4, 4, n, p, q, -1))

  def along(a):
    return [a[0] + a[1] + a[2], a[1] - a[2] - a[3]]
  y = jnp.stack([jnp.stack(along(r)) for r in along(m)])  # [2 (row), 2 (col), N, p, q, in]
  y = jnp.transpose(y, (2, 3, 0, 4, 1, 5)).reshape(n, 2 * p, 2 * q, -1)
  return y[:, :h, :wd]


# form → grad(x, w, g), each returning the dtype XLA's vjp does.
INPUT_GRADS = dict(xla=input_grad_xla, winograd=_in_float32(input_grad_winograd, "x"),
                   matmuls=_in_float32(input_grad_matmuls, "x"))
WEIGHT_GRADS = dict(xla=weight_grad_xla, winograd=_in_float32(weight_grad_winograd, "w"),
                    matmuls=_in_float32(weight_grad_matmuls, "w"))


# ---------------------------------------------------------------------------------------------------------------
# The op.

def forms_for(x, w):
  """`choose`'s forms for the shapes of x and w (a non-square image counts by its pixels: side = √(H·W))."""
  n, h, wd, cin = x.shape
  return choose(n, math.isqrt(h * wd), cin, w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x, w, forms=None):
  """The 3×3 stride-1 'SAME' convolution of x [N, H, W, in] with w [3, 3, in, out] (XLA's; `forward_form`'s im2col
  on tiny images), whose backward pass computes (input gradient, weight gradient) in `forms` (two of FORMS; None:
  `choose`'s for the shape)."""
  del forms
  return _forward(x, w)


def _conv_fwd(x, w, forms):
  return _forward(x, w), (x, w)


def _conv_bwd(forms, residuals, g):
  x, w = residuals
  input_form, weight_form = forms or forms_for(x, w)
  if (input_form, weight_form) == ("xla", "xla"):
    return jax.vjp(xla_conv, x, w)[1](g)  # autodiff's own backward pass, unchanged
  return INPUT_GRADS[input_form](x, w, g), WEIGHT_GRADS[weight_form](x, w, g)


conv.defvjp(_conv_fwd, _conv_bwd)


class Conv3x3:
  """`lax.conv_general_dilated` for `nn.Conv(…, conv_general_dilated_cls=Conv3x3)`: `conv` for a 3×3 stride-1 'SAME'
  convolution (the only kind it takes), so that the module's params and their names stay nn.Conv's own."""

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
               feature_group_count=1, precision=None, **kwargs):
    expected = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS)
    plain = (tuple(window_strides) == (1, 1) and padding == "SAME" and rhs.shape[:2] == (3, 3)
             and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
             and feature_group_count == 1 and precision is None and not kwargs
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == expected)
    if not plain:
      raise ValueError(f"Conv3x3 takes only 3×3 stride-1 'SAME' NHWC/HWIO convolutions, got kernel {rhs.shape}, "
                       f"strides {window_strides}, padding {padding!r}.")
    return conv(lhs, rhs)
