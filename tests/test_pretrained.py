"""The authors' TF1 checkpoint layout (raw + EMA shadows) converts leaf for leaf; bad files get one-line errors."""
import csv
import os

import flax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import abstract, diffusers_unet, tf_names, write_tf1_checkpoint
from ddpm_jax import pretrained
from ddpm_jax.models import unet

pytest.importorskip("tensorflow")  # writes the TF1 checkpoints
# Every tensor of the CIFAR-10 U-Net: the authors' TF name and shape, the diffusers key and torch shape.
TSV = os.path.join(os.path.dirname(__file__), "data", "unet_tensor_names.tsv")


def test_cifar10_tf_checkpoint_converts_leaf_for_leaf(tmp_path):
  with open(TSV) as f:
    names = [(r["tf_name"], tuple(int(d) for d in r["tf_shape(HWIO/[in,out])"].strip("()").split(",") if d.strip()))
             for r in csv.DictReader(f, delimiter="\t")]
  values = write_tf1_checkpoint(str(tmp_path / "model.ckpt-790000"), names)
  target = abstract(unet.UNetCIFAR10(), 32)
  for weights, suffix in (("ema", pretrained.EMA_SUFFIX), ("raw", "")):
    params = pretrained.read_tf_checkpoint(str(tmp_path / "model.ckpt-790000"), target, weights=weights)
    flat = flax.traverse_util.flatten_dict(params)
    assert len(flat) == 328
    for name, _ in names:
      parts = name.split("/")[1:]
      leaf = {"W": "kernel", "b": "bias", "gamma": "scale", "beta": "bias"}[parts[-1]]
      np.testing.assert_array_equal(flat[tuple(parts[:-1] + [leaf])], values[name + suffix])


def test_256_layout_at_reduced_width_and_errors(tmp_path):
  model = unet.UNet(ch=32, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0)
  target = abstract(model, 256)
  names = tf_names(target)
  values = write_tf1_checkpoint(str(tmp_path / "ck"), names)
  params = pretrained.read_tf_checkpoint(str(tmp_path / "ck"), target)
  some = names[17][0]
  parts = some.split("/")[1:]
  np.testing.assert_array_equal(
      flax.traverse_util.flatten_dict(params)[tuple(parts[:-1] + [{"W": "kernel", "b": "bias", "gamma": "scale",
                                                                    "beta": "bias"}[parts[-1]]])],
      values[some + pretrained.EMA_SUFFIX])
  # The same checkpoint read as a wider model: the first mis-shaped tensor is named.
  wide = abstract(unet.UNet(ch=64, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0), 256)
  with pytest.raises(ValueError, match=r"tensor 'model/.*' has shape .*, expected") as e:
    pretrained.read_tf_checkpoint(str(tmp_path / "ck"), wide)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="cannot read .* as a TF checkpoint"):
    pretrained.read_tf_checkpoint(str(tmp_path / "nothing"), target)
  with pytest.raises(ValueError, match="weights must be 'ema' or 'raw'"):
    pretrained.read_tf_checkpoint(str(tmp_path / "ck"), target, weights="best")


def test_convert_diffusers_release_then_one_sampling_step_equals_ddpmscheduler(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from ddpm_jax import convert
  from ddpm_jax import diffusion as dlib
  torch.set_num_threads(2)
  pt = diffusers_unet(128, (1, 2, 2, 2), attn_level=1, size=32)  # the released CIFAR-10 architecture
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large",
                                  clip_sample=True)
  # A pipeline folder as google/ddpm-* ships it: unet/ and scheduler/.
  pt.save_pretrained(str(tmp_path / "release" / "unet"), safe_serialization=True)
  sched.save_pretrained(str(tmp_path / "release" / "scheduler"))
  info = convert.convert("diffusers", str(tmp_path / "release"), str(tmp_path / "out"))
  assert info["model"] == "cifar10" and sorted(os.listdir(tmp_path / "out")) == ["ddpm_config.json", "params"]
  assert info["config"]["diffusion.model_var_type"] == "fixedlarge" and info["config"]["sampling.clip_denoised"]
  model = unet.UNetCIFAR10()
  params = convert.load_converted(str(tmp_path / "out"), abstract(model, 32))
  sched.set_timesteps(1000)
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear"), model_var_type="fixedlarge")
  x = np.random.default_rng(3).normal(size=(1, 32, 32, 3)).astype(np.float32)
  t = 700
  noise = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    x_pt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    theirs = sched.step(pt(x_pt, t).sample, t, x_pt, generator=torch.Generator().manual_seed(0)).prev_sample
  eps = model.apply({"params": params}, jnp.asarray(x), jnp.array([t]))
  ours, _ = d.p_sample(eps, jnp.asarray(x), jnp.array([t]), jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_failed_conversions_write_nothing(tmp_path):
  from ddpm_jax import convert
  (tmp_path / "model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match="is a pickle, which is never loaded"):
    convert.convert("diffusers", str(tmp_path / "model.bin"), str(tmp_path / "out"))
  model = unet.UNet(ch=32, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0)
  write_tf1_checkpoint(str(tmp_path / "small"), tf_names(abstract(model, 256)))
  with pytest.raises(ValueError, match="has shape .*, expected"):  # 6 levels → the full-width 256² preset
    convert.convert("tf", str(tmp_path / "small"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="exists and is not empty"):
    convert.convert("tf", str(tmp_path / "small"), str(tmp_path / "busy"))
  assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_scheduler_settings_map_to_our_config(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  from ddpm_jax import convert
  diffusers.DDPMScheduler(variance_type="fixed_small", beta_schedule="squaredcos_cap_v2", clip_sample=False,
                          num_train_timesteps=4000).save_pretrained(str(tmp_path))
  assert convert.settings_from_scheduler(str(tmp_path)) == {
      "diffusion.model_var_type": "fixedsmall", "diffusion.beta_schedule": "cosine", "diffusion.beta_start": 1e-4,
      "diffusion.beta_end": 0.02, "diffusion.num_timesteps": 4000, "sampling.clip_denoised": False}
  diffusers.DDPMScheduler(variance_type="fixed_small_log", beta_schedule="sigmoid").save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="beta_schedule 'sigmoid' have no counterpart"):
    convert.settings_from_scheduler(str(tmp_path))


def test_main_samples_from_converted_weights(tmp_path):
  """--mode=sample with --config.restore_from and an empty workdir: the converted params, through main.py's path."""
  import subprocess
  import sys
  from ddpm_jax import convert
  model = unet.UNetCIFAR10()
  write_tf1_checkpoint(str(tmp_path / "ck" / "model.ckpt-790000"), tf_names(abstract(model, 32)))
  convert.convert("tf", str(tmp_path / "ck" / "model.ckpt-790000"), str(tmp_path / "converted"))
  cmd = [sys.executable, "main.py", "--config=configs/cifar10.py", f"--workdir={tmp_path / 'run'}", "--mode=sample",
         f"--config.restore_from={tmp_path / 'converted'}", "--config.diffusion.num_timesteps=2",
         "--config.sampling.num_samples=8", "--config.sampling.batch_size=8"]
  root = os.path.join(os.path.dirname(__file__), "..")
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = np.load(tmp_path / "run" / "samples" / "step_00000000" / "samples_00000_host0.npz")["arr_0"]
  assert samples.shape == (8, 32, 32, 3) and samples.dtype == np.uint8 and samples.std() > 0
  wrong = [sys.executable, "main.py", "--config=configs/digits.py", f"--workdir={tmp_path / 'run2'}", "--mode=sample",
           f"--config.restore_from={tmp_path / 'converted'}"]
  proc = subprocess.run(wrong, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and "holds the cifar10 U-Net (32²) but the config is for 8²" in proc.stderr
