"""Our U-Net against diffusers' UNet2DModel (PyTorch) with the same random weights: the same function."""
import csv
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import diffusers_unet
from ddpm_jax import pretrained
from ddpm_jax.models import unet

torch = pytest.importorskip("torch", reason="the diffusers cross-checks need torch==2.13.0 (the test extra)")
diffusers = pytest.importorskip("diffusers", reason="the diffusers cross-checks need diffusers (the test extra)")
# Every tensor of the CIFAR-10 U-Net: the authors' TF name and shape, the diffusers key and torch shape.
TSV = os.path.join(os.path.dirname(__file__), "data", "unet_tensor_names.tsv")
LEAF = {"W": "kernel", "b": "bias", "gamma": "scale", "beta": "bias"}


def ours_from(model_pt, ours, size):
  abstract = jax.eval_shape(lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                              jnp.zeros((1,), jnp.int32)))["params"]
  state = {k: v.detach().numpy() for k, v in model_pt.state_dict().items()}
  return pretrained.params_from_diffusers(state, abstract, len(ours.ch_mult))


def compare(model_pt, ours, params, size, batch):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  t = np.array([0, 999, 500, 17][:batch])
  with torch.no_grad():
    ref = model_pt(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(lambda p, xx, tt: ours.apply({"params": p}, xx, tt))(params, x, t))
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert np.linalg.norm(ref) > 1e-3  # a non-trivial output (diffusers' init is not near-zero)
  return rel


def test_mapping_matches_the_reference_table():
  with open(TSV) as f:
    for row in csv.DictReader(f, delimiter="\t"):
      parts = row["tf_name"].split("/")[1:]
      assert pretrained.diffusers_key(tuple(parts[:-1] + [LEAF[parts[-1]]]), 4) == row["diffusers_key"], row


def test_cifar10_layout_reduced_width_matches_diffusers():
  torch.set_num_threads(2)
  pt = diffusers_unet(32, (1, 2, 2, 2), attn_level=1, size=32)
  ours = unet.UNet(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.0)
  assert compare(pt, ours, ours_from(pt, ours, 32), 32, batch=4) <= 1e-5


def test_256_layout_reduced_width_and_size_matches_diffusers():
  torch.set_num_threads(2)
  # The 256² block layout (ch_mult 1,1,2,2,4,4) at 64×64, so attention at 16×16 sits on level 2.
  pt = diffusers_unet(32, (1, 1, 2, 2, 4, 4), attn_level=2, size=64)
  ours = unet.UNet(ch=32, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0)
  assert compare(pt, ours, ours_from(pt, ours, 64), 64, batch=2) <= 1e-5


def test_full_cifar10_model_matches_diffusers_and_the_paper_param_count():
  torch.set_num_threads(2)
  pt = diffusers_unet(128, (1, 2, 2, 2), attn_level=1, size=32)
  assert sum(p.numel() for p in pt.parameters()) == 35_746_307
  ours = unet.UNetCIFAR10(dropout=0.0)
  assert compare(pt, ours, ours_from(pt, ours, 32), 32, batch=2) <= 1e-5


def test_bad_checkpoints_get_one_line_errors(tmp_path):
  pt = diffusers_unet(32, (1, 2, 2, 2), attn_level=1, size=32)
  ours = unet.UNet(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.0)
  abstract = jax.eval_shape(lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                              jnp.zeros((1,), jnp.int32)))["params"]
  state = {k: v.detach().numpy() for k, v in pt.state_dict().items()}
  # Legacy attention names are accepted.
  legacy = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
  flax.traverse_util.flatten_dict(pretrained.params_from_diffusers(legacy, abstract, 4))
  bad = dict(state)
  bad["down_blocks.1.resnets.0.conv1.weight"] = np.zeros((64, 32, 3, 1), np.float32)
  with pytest.raises(ValueError, match=r"'down_blocks.1.resnets.0.conv1.weight' has shape .* expected \(3, 3, 32, 64\)"):
    pretrained.params_from_diffusers(bad, abstract, 4)
  missing = {k: v for k, v in state.items() if not k.startswith("conv_out.")}
  with pytest.raises(ValueError, match="no tensor 'conv_out.bias'|no tensor 'conv_out.weight'"):
    pretrained.params_from_diffusers(missing, abstract, 4)
  # Files: safetensors round trip; pickles refused without being opened; a truncated file is a clear error.
  from safetensors.numpy import save_file
  save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  loaded = pretrained.read_safetensors(str(tmp_path))
  np.testing.assert_array_equal(loaded["conv_in.weight"], state["conv_in.weight"])
  torch.save(pt.state_dict(), tmp_path / "model.bin")
  with pytest.raises(ValueError, match="is a pickle, which is never loaded"):
    pretrained.read_safetensors(str(tmp_path / "model.bin"))
  blob = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ValueError, match="cannot read .*cut.safetensors as safetensors") as e:
    pretrained.read_safetensors(str(tmp_path / "cut.safetensors"))
  assert "\n" not in str(e.value)


def test_one_train_step_matches_a_pytorch_step_with_diffusers():
  """The golden reference for a whole train step: PyTorch's UNet2DModel, MSE on ε, clip to norm 1, torch Adam."""
  import functools
  import ml_collections
  from ddpm_jax import diffusion as dlib
  from ddpm_jax import train_step
  torch.set_num_threads(2)
  pt = diffusers_unet(32, (1, 2, 2, 2), attn_level=1, size=32)
  ours = unet.UNet(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.0)
  params = ours_from(pt, ours, 32)
  optim = ml_collections.ConfigDict(dict(lr=2e-4, warmup_steps=0, lr_anneal_steps=0, beta1=0.9, beta2=0.999, eps=1e-8,
                                         grad_clip=1.0, ema_decay=0.9999))
  tx, schedule = train_step.create_optimizer(optim)
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=1000))
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))
  x0 = np.random.default_rng(2).uniform(-1, 1, size=(4, 32, 32, 3)).astype(np.float32)
  rng = jax.random.PRNGKey(5)
  step = jax.jit(jax.vmap(functools.partial(train_step.train_step, model=ours, diffusion=d, tx=tx, schedule=schedule,
                                            ema_decay=0.9999, rng=rng), axis_name="batch"))
  new, metrics = step(jax.tree.map(lambda x: x[None], state), x0[None], jnp.arange(4)[None])

  # The same t and ε, derived as the train step documents: keys folded from (rng, step, slot).
  example_rng, _ = jax.random.split(jax.random.fold_in(rng, 0))
  keys = [jax.random.fold_in(example_rng, s) for s in range(4)]
  t = np.array([int(jax.random.randint(jax.random.fold_in(k, 0), (), 0, 1000)) for k in keys])
  eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 1), (32, 32, 3))) for k in keys])
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
  x_t = (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps).astype(np.float32)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  opt = torch.optim.Adam(pt.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
  loss = torch.mean((pt(nchw(x_t), torch.from_numpy(t)).sample - nchw(eps)) ** 2)
  loss.backward()
  grad_norm = torch.nn.utils.clip_grad_norm_(pt.parameters(), 1.0)
  opt.step()

  np.testing.assert_allclose(metrics["loss"][0], loss.item(), rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"][0], grad_norm.item(), rtol=1e-4)
  after = ours_from(pt, ours, 32)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  got, want, before = flat(jax.tree.map(lambda x: x[0], new.params)), flat(after), flat(params)
  assert np.linalg.norm(want - before) > 1e-3  # the step moved the params
  # Whole-tree error: Adam's first step is ≈ lr·sign(g), so zero-gradient leaves flip on float noise in any port.
  assert np.linalg.norm(got - want) / np.linalg.norm(want - before) <= 1e-3
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[0], new.ema_params)),
                             0.9999 * before + 0.0001 * got, rtol=1e-6, atol=1e-9)
