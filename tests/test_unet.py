"""The U-Net's parameter counts and names against the paper and the authors' TF variables, and its checks."""
import csv
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import unet
from conftest import jaxpr_eqns, perturbed

# Every tensor of the CIFAR-10 U-Net: the authors' TF name and shape, the diffusers key and torch shape.
TSV = os.path.join(os.path.dirname(__file__), "data", "unet_tensor_names.tsv")
LEAF = {"W": "kernel", "b": "bias", "gamma": "scale", "beta": "bias"}


def param_shapes(model, size, channels=3):
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)),
                                                jnp.zeros((1,), jnp.int32)))
  return {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(variables["params"]).items()}


def count(shapes):
  return sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize("model,size,expected", [
    (unet.UNetCIFAR10(), 32, 35_746_307),  # paper: "35.7M"
    (unet.UNetCIFAR10(out_ch=6), 32, 35_749_766),  # learned Σ: the network also outputs a log-variance
    (unet.UNet256(), 256, 113_673_219),  # paper: "114M"
])
def test_param_counts_match_the_paper(model, size, expected):
  assert count(param_shapes(model, size)) == expected


def test_every_param_matches_the_authors_tf_variables():
  with open(TSV) as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  assert len(rows) == 328
  expected = {}
  for row in rows:
    parts = row["tf_name"].split("/")
    assert parts[0] == "model"
    expected["/".join(parts[1:-1] + [LEAF[parts[-1]]])] = tuple(int(d) for d in row["tf_shape(HWIO/[in,out])"].strip("()").split(",") if d.strip())
  assert param_shapes(unet.UNetCIFAR10(), 32) == expected


def test_forward_shapes_dropout_and_channels():
  model = unet.UNetTiny(out_ch=2, dropout=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
  t = jnp.array([0, 5, 999])
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x, t)
  apply = jax.jit(model.apply, static_argnames="train")  # one program per call signature, not one per op
  # Near-zero init of the output conv (scale 1e-10): the untrained model outputs ~0, as the original.
  assert float(jnp.abs(apply(variables, x, t)).max()) < 1e-3  # ~1 with a scale-1 init
  params = jax.tree.map(lambda p: p + 0.05, variables["params"])  # make every layer matter
  out_eval = apply({"params": params}, x, t)
  assert out_eval.shape == (3, 8, 8, 2) and out_eval.dtype == jnp.float32
  np.testing.assert_array_equal(out_eval, apply({"params": params}, x, t, train=False))
  out_train = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(out_train, out_eval)  # dropout is active only when training
  # The timestep changes the output (the embedding is wired in).
  assert not np.allclose(out_eval[0], apply({"params": params}, x, jnp.array([500, 5, 999]))[0])


def test_rectangular_inputs_work():
  model = unet.UNetTiny(attn_resolutions=())
  x = jnp.zeros((1, 8, 16, 3))
  assert jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32))[0]
                        ).shape == (1, 8, 16, 3)


def test_timestep_embedding_closed_form():
  emb = unet.timestep_embedding(jnp.array([0, 3]), 8)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3 * freqs), np.cos(3 * freqs)]), rtol=1e-6)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("kwargs,size,msg", [
    (dict(ch_mult=(1, 2, 2, 2)), 36, "image size 36 is not divisible by 2\\^3 = 8"),
    (dict(attn_resolutions=(16,)), 32, "attn_resolutions \\[16\\] never occur for image size 32"),
])
def test_impossible_sizes_fail_with_one_line_errors(kwargs, size, msg):
  model = unet.UNet(ch=32, num_res_blocks=1, **{"ch_mult": (1, 2), "attn_resolutions": (), **kwargs})
  if "attn_resolutions" in kwargs:
    model = unet.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    msg = "attn_resolutions \\[8\\] never occur for image size 64"
    size = 64
  with pytest.raises(ValueError, match=msg) as e:
    model.check_image_size(size)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=msg):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32))


def test_channels_not_divisible_by_groupnorm_groups_fail_at_construction():
  with pytest.raises(ValueError, match="not divisible by GroupNorm's 32 groups"):
    unet.UNet(ch=48)


def test_remat_keeps_param_names_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([3, 700])
  plain, remat = unet.UNetTiny(dropout=0.3), unet.UNetTiny(dropout=0.3, remat=True)
  shapes = lambda m: jax.tree.map(lambda v: (v.shape, v.dtype), jax.eval_shape(m.init, jax.random.PRNGKey(1), x, t))
  assert shapes(plain) == shapes(remat)  # the same paths, so checkpoints stay loadable
  assert "conv1" in shapes(remat)["params"]["down_1"]["block_0"]
  params = perturbed(jax.jit(plain.init)(jax.random.PRNGKey(1), x, t)["params"], 0.02)

  def grads(model):
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)}) ** 2)
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params))])

  g_plain, g_remat = grads(plain), grads(remat)
  # Same dropout masks and the same math: only float rounding may differ (1.3e-6 seen; another mask would give ~1).
  assert np.linalg.norm(g_remat - g_plain) <= 1e-5 * np.linalg.norm(g_plain)
  # Every ResnetBlock (2 down, 2 mid, 4 up) is a checkpoint region; without remat there is none.
  count = lambda m: sum(e.primitive.name in ("checkpoint", "remat2") for e in jaxpr_eqns(jax.make_jaxpr(
      lambda p: m.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)}))(params).jaxpr))
  assert (count(plain), count(remat)) == (0, 8)


def test_bfloat16_runs_activations_in_bfloat16_with_float32_params():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  t = jnp.array([0, 10, 500, 999])
  f32, bf16 = unet.UNetTiny(), unet.UNetTiny(dtype=jnp.bfloat16)
  variables = jax.jit(bf16.init)(jax.random.PRNGKey(1), x, t)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}  # optimizer and EMA in f32
  params = perturbed(variables["params"], 0.02)
  jaxpr = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, x, t))(params).jaxpr
  heavy = [e for e in jaxpr_eqns(jaxpr) if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert len(heavy) >= 20  # 20 convs, plus the dense layers and attention
  assert all(v.aval.dtype == jnp.bfloat16 for e in heavy for v in e.invars), "a conv or matmul ran in float32"
  out16, out32 = (jax.jit(m.apply)({"params": params}, x, t) for m in (bf16, f32))
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  # bfloat16 keeps 8 significant bits (2^-8 ≈ 4e-3 per rounding); ~20 layers of it give ~1e-2.
  assert 1e-4 < rel <= 2e-2, rel
  grads = jax.jit(jax.grad(lambda p: jnp.sum(bf16.apply({"params": p}, x, t) ** 2)))(params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
