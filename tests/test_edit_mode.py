"""--mode=edit end to end on the tiny config: inputs from config.data, an .npz or a folder; named and file masks;
known pixels kept exactly; the same edits whatever the batch split; SDEdit; one-line errors before any work."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import perturbed, tiny_edit_config
from ddpm_jax import config_checks
from ddpm_jax import diffusion as dlib
from ddpm_jax import editing
from ddpm_jax import fileio
from ddpm_jax import paths
from ddpm_jax import sampling
from ddpm_jax.modes import edit
from ddpm_jax.modes import train
from ddpm_jax.models import unet


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir holding a 2-step tiny run (the edits need params, not good ones)."""
  workdir = str(tmp_path_factory.mktemp("edit_run"))
  train.train_and_evaluate(tiny_edit_config(), workdir)
  return workdir


def _results(out_dir):
  f = fileio.load_npz(os.path.join(out_dir, "edited.npz"))
  return f["arr_0"], f["arr_1"], f["arr_2"]


def test_inpainting_keeps_the_known_pixels_and_does_not_depend_on_the_batch(trained):
  config = tiny_edit_config()
  config_checks.validate(config, "edit")
  out = edit.run(config, trained)
  assert os.path.basename(out) == "step_00000002_inpaint_half_6_j2x3"
  assert os.path.isfile(os.path.join(out, "sheet.png"))
  edited, inputs, masks = _results(out)
  assert edited.shape == inputs.shape == (12, 8, 8, 1) and masks.shape == (12, 8, 8, 1)
  np.testing.assert_array_equal(masks[:, :4], 1)  # 'half': the top half is known…
  np.testing.assert_array_equal(masks[:, 4:], 0)
  np.testing.assert_array_equal(edited[:, :4], inputs[:, :4])  # …and kept exactly
  assert np.abs(edited[:, 4:].astype(int) - inputs[:, 4:]).mean() > 5  # the rest was generated
  # A global batch of 16 (a padded last batch of 12 here) gives the same edits as batches of 8.
  config.sampling.batch_size = 16
  os.rename(out, out + "_batch8")
  np.testing.assert_array_equal(_results(edit.run(config, trained))[0], edited)


def test_inputs_and_masks_from_files_and_sdedit(trained, tmp_path):
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "inputs.npz", inputs)
  os.mkdir(tmp_path / "masks")
  for i in range(12):  # keep the left half of each image, as PNGs
    Image.fromarray(np.repeat([[255] * 4 + [0] * 4], 8, axis=0).astype(np.uint8)).save(tmp_path / "masks" / f"{i}.png")
  config = tiny_edit_config(inputs=str(tmp_path / "inputs.npz"), masks=str(tmp_path / "masks"))
  config_checks.validate(config, "edit")
  edited, read, masks = _results(edit.run(config, trained))
  np.testing.assert_array_equal(read, inputs)
  np.testing.assert_array_equal(masks[..., :4, :], 1)
  np.testing.assert_array_equal(edited[..., :4, :], inputs[..., :4, :])

  sdedit = tiny_edit_config(task="sdedit", strength=0.3, inputs=str(tmp_path / "inputs.npz"))
  out = edit.run(sdedit, trained)
  assert os.path.basename(out) == "step_00000002_sdedit_0.3_6"
  edited, _, _ = _results(out)
  assert edited.shape == inputs.shape and not np.array_equal(edited, inputs)


def test_a_conditional_model_edits_towards_each_inputs_label_or_the_given_labels(tmp_path):
  config = tiny_edit_config(task="sdedit", strength=0.6, num_images=8)
  config.model.num_classes, config.model.class_dropout = 10, 0.1  # the digits' own labels are read with the images
  config.sampling.guidance_scale = 2.0
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  config_checks.validate(config, "edit")
  own = edit.run(config, workdir)
  assert os.path.basename(own) == "step_00000002_sdedit_0.6_6_w2.0"
  # The first 8 of scikit-learn's digits are 0, 1, …, 7.
  np.testing.assert_array_equal(fileio.load_npz(os.path.join(own, "edited.npz"))["arr_3"], np.arange(8))
  config.sampling.labels = (9, 8)  # given labels win, cycled over the images
  given = edit.run(config, workdir)
  assert os.path.basename(given) == "step_00000002_sdedit_0.6_6_w2.0_labels9-8"
  np.testing.assert_array_equal(fileio.load_npz(os.path.join(given, "edited.npz"))["arr_3"], [9, 8] * 4)


def test_a_conditional_models_edits_are_its_guided_chain_for_each_images_label():
  # A 2-step model's output is ~0 whatever the label: perturbed params, so that the labels matter.
  model = unet.UNetTiny(out_ch=1, num_classes=10)
  params = perturbed(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)),
                                         jnp.zeros((1,), jnp.int32))["params"], 0.02)
  diffusion = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=0.2, num_timesteps=20))
  e = tiny_edit_config(task="sdedit", strength=0.6, num_steps=5).edit
  inputs = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
  masks, rng, labels = np.zeros((8, 8, 8, 1), np.float32), jax.random.PRNGKey(7), np.array([3, 1, 4, 1, 5, 9, 2, 6])
  edited = lambda labels: edit.edit_images(model, params, diffusion, inputs, masks, rng, e, 8, labels=labels,
                                           guidance_scale=2.0)[0][1]
  got = edited(labels)  # split over the 8 devices
  want = editing.sdedit(sampling.unet_model_fn(model, params, jnp.asarray(labels, jnp.int32), 2.0), diffusion,
                        (inputs / 127.5 - 1.0).astype(np.float32), 0.6, rng, num_steps=5)  # one guided chain
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert np.abs(edited(np.full(8, 9)) - got).max() > 1e-2  # other labels, other edits


def test_a_conditional_model_needs_labelled_inputs_or_sampling_labels(tmp_path):
  np.savez(tmp_path / "unlabelled.npz", np.zeros((4, 8, 8, 1), np.uint8))
  config = tiny_edit_config(inputs=str(tmp_path / "unlabelled.npz"), num_images=4)
  config.model.num_classes = 10
  with pytest.raises(ValueError, match="has no 'arr_1' of labels.*or give the classes in sampling.labels") as e:
    edit.load_inputs(config)
  assert "\n" not in str(e.value)
  config.sampling.labels = (3,)
  images, labels = edit.load_inputs(config)
  assert images.shape == (4, 8, 8, 1) and list(labels) == [3, 3, 3, 3]


@pytest.mark.parametrize("fields,message", [
    (dict(masks="left"), "edit.masks = 'left': neither a mask name nor an existing file or folder"),
    (dict(inputs="no/such.npz"), "edit.inputs = 'no/such.npz': no such file or folder"),
    (dict(jump_length=7, jumps=2), "edit.jump_length = 7: jump_length 7 exceeds the chain's 6 steps"),
    (dict(task="sdedit", strength=0.0), "edit.strength = 0.0: out of range"),
    (dict(num_steps=101), "edit.num_steps = 101: more than the diffusion's T = 100 steps"),
    (dict(task="repaint"), "edit.task = 'repaint': unknown value"),
])
def test_edit_config_mistakes_are_one_line_errors(fields, message):
  with pytest.raises(ValueError, match=message) as e:
    config_checks.validate(tiny_edit_config(**fields), "edit")
  assert "\n" not in str(e.value)


def test_mask_names_stay_names_and_mask_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "m.npz").write_bytes(b"")
  named, path = tiny_edit_config(masks="half", inputs="x.npz"), tiny_edit_config(masks="m.npz")
  paths.absolute_config_paths(named)
  paths.absolute_config_paths(path)
  assert named.edit.masks == "half" and named.edit.inputs == str(tmp_path / "x.npz")
  assert path.edit.masks == str(tmp_path / "m.npz")
