"""Our params → a diffusers UNet2DModel state dict (pretrained.params_to_diffusers): exact, and the same function."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import pretrained
from ddpm_jax.models import unet

torch = pytest.importorskip("torch", reason="the diffusers cross-checks need torch==2.13.0 (the test extra)")
diffusers = pytest.importorskip("diffusers", reason="the diffusers cross-checks need diffusers (the test extra)")

# The digits demo's layout at a smaller width: two resolutions, attention at 4×4, one channel (a 1×1 shortcut too).
FIELDS = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
SIZE, CHANNELS = 8, 1


@pytest.fixture(scope="module")
def ours():
  model = unet.UNet(out_ch=CHANNELS, dropout=0.0, **FIELDS)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, CHANNELS)),
                            jnp.zeros((1,), jnp.int32))["params"]
  # Random values for every tensor, biases and norm scales too (init leaves them 0 and 1), so that a swapped or
  # dropped tensor shows; NumPy, not model.init: compiling the init alone takes a minute on a busy CPU.
  rng = np.random.default_rng(3)
  scaled = lambda leaf: (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]) or 1)).astype(np.float32)
  return model, jax.tree.map(scaled, abstract)


def test_round_trip_is_exact(ours):
  model, params = ours
  state = pretrained.params_to_diffusers(params, len(FIELDS["ch_mult"]))
  abstract = jax.eval_shape(lambda: params)
  back = pretrained.params_from_diffusers(state, abstract, len(FIELDS["ch_mult"]))
  flat, flat_back = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(back)
  assert flat.keys() == flat_back.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(flat_back[path], np.asarray(value), err_msg="/".join(path))


def test_diffusers_runs_the_exported_params_as_ours(ours):
  torch.set_num_threads(2)
  model, params = ours
  kwargs = pretrained.diffusers_unet_kwargs(**FIELDS, image_size=SIZE, channels=CHANNELS)
  theirs = diffusers.UNet2DModel(**kwargs).eval()
  state = pretrained.params_to_diffusers(params, len(FIELDS["ch_mult"]))
  assert set(state) == set(theirs.state_dict())
  for key, value in theirs.state_dict().items():  # the torch layout, not just the same number of values
    assert state[key].shape == tuple(value.shape), key
  theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)

  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, SIZE, SIZE, CHANNELS)).astype(np.float32)
  t = np.array([0, 999, 500, 17])
  with torch.no_grad():
    ref = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(lambda p, xx, tt: model.apply({"params": p}, xx, tt))(params, x, t))
  assert np.linalg.norm(ref) > 1e-2  # a non-trivial output
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
