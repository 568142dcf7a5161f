"""conv3x3: every gradient form equals XLA's vjp (float32 and bfloat16, odd and tiny sides, batch 1), the rule picks
valid forms, the op works under jit, vmap, pmap and remat, and the U-Net with conv_impl 'auto' is the 'xla' one:
the same params, the same forward output, the same gradients."""
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jaxpr_eqns, max_rel_diff, tiny_config
from ddpm_jax import train_step
from ddpm_jax.models import conv3x3
from ddpm_jax.models import unet


def _inputs(n, h, w, cin, cout, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(keys[0], (n, h, w, cin), dtype)
  k = jax.random.normal(keys[1], (3, 3, cin, cout), dtype)
  g = jax.random.normal(keys[2], (n, h, w, cout), dtype)
  return x, k, g


def _every_form(x, w, g):
  """(XLA's dx, dw), {form: dx}, {form: dw}: one compile per shape."""
  return jax.jit(lambda x, w, g: (jax.vjp(conv3x3.xla_conv, x, w)[1](g),
                                  {f: fn(x, w, g) for f, fn in conv3x3.INPUT_GRADS.items()},
                                  {f: fn(x, w, g) for f, fn in conv3x3.WEIGHT_GRADS.items()}))(x, w, g)


def _assert_close(got, want, rel, what):
  scale = float(jnp.abs(want.astype(jnp.float32)).max())
  err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
  assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} × max |grad| {scale:.3g}"


# (batch, height, width, in, out): the digits model's 2×2 and 4×4 levels at batch 1 and 3, odd channels, and an
# 8-high image of odd width (padded to even tiles).
SHAPES = [(1, 2, 2, 3, 5), (3, 4, 4, 7, 4), (2, 8, 7, 3, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "×".join(map(str, s)))
def test_every_gradient_form_matches_xlas_vjp(shape):
  x, w, g = _inputs(*shape)
  (dx, dw), dxs, dws = _every_form(x, w, g)
  for form in conv3x3.FORMS:
    assert dxs[form].shape == dx.shape and dws[form].shape == dw.shape
    _assert_close(dxs[form], dx, 1e-5, f"input gradient, {form}")
    _assert_close(dws[form], dw, 1e-5, f"weight gradient, {form}")


def test_the_forward_pass_is_xlas_convolution_and_im2col_on_tiny_images():
  assert [conv3x3.forward_form(side) for side in (1, 2, 3, 4, 32)] == ["im2col", "im2col", "xla", "xla", "xla"]
  for shape in ((3, 2, 2, 5, 4), (2, 1, 3, 3, 6), (2, 8, 7, 3, 6)):  # 2×2 and 1×3 take im2col, 8×7 XLA's
    x, w, _ = _inputs(*shape)
    got, im2col, want = jax.jit(lambda x, w: (conv3x3.conv(x, w), conv3x3.im2col_conv(x, w),
                                              conv3x3.xla_conv(x, w)))(x, w)
    _assert_close(im2col, want, 1e-6, f"im2col at {shape}")
    ops = {e.primitive.name for e in jaxpr_eqns(jax.make_jaxpr(conv3x3.conv)(x, w).jaxpr)}
    assert ("conv_general_dilated" in ops) == (shape[1] * shape[2] > 4), ops
    if shape[1] * shape[2] > 4:
      np.testing.assert_array_equal(got, want)  # XLA's own, bit for bit
    else:
      _assert_close(got, want, 1e-6, f"forward at {shape}")


@pytest.mark.parametrize("shape", [(1, 5, 4, 3, 6)], ids=lambda s: "×".join(map(str, s)))
def test_bfloat16_gradients_have_xlas_dtypes_and_accuracy(shape):
  x, w, g = _inputs(*shape, dtype=jnp.bfloat16)
  (dx, dw), dxs, dws = _every_form(x, w, g)
  (dx32, dw32), _, _ = _every_form(*(a.astype(jnp.float32) for a in (x, w, g)))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  for form in conv3x3.FORMS:
    assert dxs[form].dtype == dws[form].dtype == jnp.bfloat16, form
    # Against the float32 gradient of the same (bfloat16-valued) inputs: the one rounding of the result, 2^-8,
    # with room for a few ulps; XLA's own bfloat16 gradient is held to the same.
    _assert_close(dxs[form], dx32, 2 ** -7, f"bfloat16 input gradient, {form}")
    _assert_close(dws[form], dw32, 2 ** -7, f"bfloat16 weight gradient, {form}")
  _assert_close(dx, dx32, 2 ** -7, "XLA's bfloat16 input gradient")


def test_the_rule_returns_valid_forms_and_uses_winograd_where_it_was_measured_faster():
  for batch in (1, 2, 8, 32, 64, 128):
    for side in (1, 2, 3, 4, 8, 16, 32, 64, 256):
      for cin in (1, 3, 32, 64, 128, 256, 384, 512):
        for cout in (1, 3, 32, 128, 256):
          for pays in (True, False):
            forms = conv3x3.choose(batch, side, cin, cout, pays)
            assert isinstance(forms, tuple) and len(forms) == 2 and set(forms) <= set(conv3x3.FORMS), forms
            assert forms == conv3x3.choose(batch, side, cin, cout, pays)  # a pure function of the shape and CPU
            assert pays or forms[1] == "xla"  # where Winograd does not pay, XLA's weight gradient throughout
  assert conv3x3.choose(32, 32, 128, 128, True) == conv3x3.choose(8, 32, 128, 128, True) == ("xla", "winograd")
  assert conv3x3.choose(8, 32, 128, 128, False) == ("xla", "xla")
  for pays in (True, False):
    assert conv3x3.choose(64, 8, 32, 32, pays) == ("xla", "xla")  # the digits model's narrow convolutions: XLA's
    assert conv3x3.choose(64, 2, 64, 64, pays) == ("matmuls", "xla")  # 2×2 images: faster on every CPU measured
  # Without the argument: this machine's CPU decides, by the vendor /proc/cpuinfo names.
  pays_here = conv3x3.cpu_info("vendor_id") == "GenuineIntel"
  assert conv3x3.winograd_pays_here() == pays_here
  assert conv3x3.choose(8, 32, 128, 128) == ("xla", "winograd" if pays_here else "xla")


def _loss(conv):
  return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))  # a cotangent that varies over the output


def test_gradients_under_jit_checkpoint_vmap_and_pmap():
  # Winograd's input gradient with the matmuls' weight gradient here; the U-Net test below runs the other pairing.
  forms = ("winograd", "matmuls")
  x, w, _ = _inputs(4, 4, 6, 5, 7)
  custom = lambda x, w: conv3x3.conv(x, w, forms)
  grad = lambda loss: jax.grad(loss, argnums=(0, 1))
  # One program: XLA's gradients, ours under jit, under jax.checkpoint, and vmapped over examples (batch 1 each:
  # per-example weight gradients, whose sum is the batch's).
  want, plain, remat, per_example = jax.jit(lambda x, w: (
      grad(_loss(conv3x3.xla_conv))(x, w), grad(_loss(custom))(x, w), grad(jax.checkpoint(_loss(custom)))(x, w),
      jax.vmap(grad(_loss(custom)), in_axes=(0, None))(x[:, None], w)))(x, w)
  for name, got in (("jit", plain), ("checkpoint", remat)):
    for value, ref, what in zip(got, want, ("dx", "dw")):
      _assert_close(value, ref, 1e-5, f"{name} {what}")
  _assert_close(per_example[0][:, 0], want[0], 1e-5, "vmap dx")
  _assert_close(per_example[1].sum(0), want[1], 1e-5, "vmap dw")
  # pmap over 2 of conftest's 8 CPU devices, 2 examples each, gradients summed across them.
  grads = jax.pmap(lambda x, w: jax.lax.psum(jax.grad(_loss(custom), argnums=1)(x, w), "d"), axis_name="d",
                   in_axes=(0, None))(x.reshape(2, 2, *x.shape[1:]), w)
  _assert_close(grads[0], want[1], 1e-5, "pmap dw")


def test_conv3x3_takes_only_3x3_stride_1_same_convolutions():
  x, w, _ = _inputs(1, 4, 4, 2, 2)
  dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(conv3x3.Conv3x3()(x, w, (1, 1), "SAME", dimension_numbers=dims),
                                conv3x3.xla_conv(x, w))
  with pytest.raises(ValueError, match=r"^Conv3x3 takes only 3×3 stride-1 'SAME' .* strides \(2, 2\)"):
    conv3x3.Conv3x3()(x, w, (2, 2), "SAME", dimension_numbers=dims)
  with pytest.raises(ValueError, match=re.escape("model.conv_impl = 'fast': unknown value; use one of 'auto', 'xla'.")):
    unet.UNetTiny(conv_impl="fast")


def test_unet_auto_is_the_xla_unet_same_params_output_and_gradients(monkeypatch):
  """conv_impl 'auto' (CPU: conv3x3) against 'xla' on the tiny U-Net, with the non-XLA forms forced: the tiny
  model's own shapes would all take XLA's forms, which would test nothing."""
  assert jax.default_backend() == "cpu"
  assert train_step.create_model(tiny_config()).conv_impl == "auto"  # the config's field reaches the U-Net
  # The forms the rule picks for CIFAR-10 (Winograd's weight gradient) and at 2×2 (the matmuls' input gradient), on
  # the 8×8 level (10 of the 19 convolutions; Winograd's transforms make the compile 3× longer where they are).
  monkeypatch.setattr(conv3x3, "choose", lambda b, side, cin, cout: ("matmuls", "winograd") if side == 8 else
                      ("xla", "xla"))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([3, 700])
  auto, xla = unet.UNetTiny(conv_impl="auto"), unet.UNetTiny(conv_impl="xla")
  abstract = {impl: jax.eval_shape(lambda k, m=m: m.init(k, x, t)["params"], jax.random.PRNGKey(1))
              for impl, m in (("auto", auto), ("xla", xla))}
  assert jax.tree.map(jnp.shape, abstract["auto"]) == jax.tree.map(jnp.shape, abstract["xla"])  # weights still load
  # …and one conv module's init is the same from the same key (the U-Net's others are the same modules).
  conv = lambda impl: unet._conv(32, "conv", conv_impl=impl)  # pylint: disable=protected-access
  inits = [conv(impl).init(jax.random.PRNGKey(2), x) for impl in ("auto", "xla")]
  jax.tree.map(np.testing.assert_array_equal, *inits)
  # Random params of those shapes (no compile of init): norm scales near 1, every other leaf well away from 0, so that
  # all layers matter (conv_out's init is ~0).
  rng = np.random.default_rng(3)  # NumPy's: jax.random eagerly per leaf shape would compile a program for each
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray((path[-1].key == "scale") + 0.1 * rng.standard_normal(leaf.shape, np.float32)),
      abstract["xla"])

  apply = lambda m: lambda p: m.apply({"params": p}, x, t)

  def output_and_grads(p):
    out = {}
    for name, m in (("auto", auto), ("xla", xla)):
      y, pullback = jax.vjp(apply(m), p)
      out[name] = y, pullback(2 * y)[0]  # the gradient of Σ y²
    return out
  (y, grads), (y_xla, grads_xla) = jax.jit(output_and_grads)(params).values()
  np.testing.assert_array_equal(y, y_xla)
  assert max_rel_diff(grads, grads_xla) <= 1e-5
  flat, flat_xla = (flax.traverse_util.flatten_dict(g, sep="/") for g in (grads, grads_xla))
  for path, want in flat_xla.items():
    if "conv" in path and path.endswith("kernel"):  # the leaves conv3x3 computes itself
      _assert_close(flat[path], want, 1e-5, path)
  # 19 convolutions go through conv3x3 (conv_in, 16 in res blocks, the upsample's, conv_out); the stride-2
  # downsample stays XLA's.
  eqns = list(jaxpr_eqns(jax.make_jaxpr(apply(auto))(params).jaxpr))
  assert sum(e.primitive.name == "custom_vjp_call" for e in eqns) == 19
  convs = [e for e in jaxpr_eqns(jax.make_jaxpr(apply(xla))(params).jaxpr) if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 20 and sum(e.params["window_strides"] == (2, 2) for e in convs) == 1
