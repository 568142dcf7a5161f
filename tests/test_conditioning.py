"""Class conditioning: the label embedding against diffusers, classifier-free guidance, label dropout, guided
sampling split over devices, conditional training and resume, labels written with samples, config errors."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal
from conftest import diffusers_unet
from conftest import max_rel_diff
from conftest import tiny_config
from ddpm_jax import config_checks
from ddpm_jax import convert
from ddpm_jax import diffusion as dlib
from ddpm_jax import sampling
from ddpm_jax import train_step
from ddpm_jax.evaluation import samples
from ddpm_jax.models import unet
from ddpm_jax.modes import train
from ddpm_jax.sampler import Sampler

torch = pytest.importorskip("torch", reason="the diffusers cross-checks need torch==2.13.0 (the test extra)")


def tiny_model(num_classes=10, out_ch=1, **kw):
  model = unet.UNetTiny(out_ch=out_ch, num_classes=num_classes, **kw)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
  # Away from the init (whose last convs are ~0), so outputs and the label's effect are not trivially small.
  return model, jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)


def test_the_option_off_is_the_paper_model_and_labels_need_it():
  model, params = tiny_model(num_classes=0)
  assert "label_emb" not in params
  plain = unet.UNetTiny(out_ch=1).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  assert jax.tree.structure(plain["params"]) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="labels were given to an unconditional U-Net; set model.num_classes"):
    model.apply({"params": params}, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32), labels=jnp.zeros(2, int))
  conditional, cparams = tiny_model()
  assert cparams["label_emb"]["embedding"].shape == (11, 4 * 32)  # ten classes and the null label


def test_converted_conditional_diffusers_unet_computes_the_same_function(tmp_path):
  """diffusers' UNet2DModel(num_class_embeds=11) at the paper's CIFAR-10 size, converted: the same outputs for
  real labels and for the null label (diffusers' label 10)."""
  torch.set_num_threads(2)
  pt = diffusers_unet(128, (1, 2, 2, 2), attn_level=1, size=32, num_classes=10)
  with torch.no_grad():
    pt.class_embedding.weight.normal_()
  pt.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
  info = convert.convert("diffusers", str(tmp_path / "unet"), str(tmp_path / "out"))
  assert info["config"]["model.num_classes"] == 10
  model = unet.UNetCIFAR10(dropout=0.0, num_classes=10)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               jnp.zeros((1,), jnp.int32)))["params"]
  params = convert.load_converted(str(tmp_path / "out"), abstract)
  x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  t, labels = np.array([0, 500, 999]), np.array([0, 9, 10])
  with torch.no_grad():
    ref = pt(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
             class_labels=torch.from_numpy(labels)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, t, labels=labels))(params))
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5
  # And the labels matter: the same x and t with other labels give another output.
  other = np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, t, labels=labels[::-1]))(params))
  assert np.linalg.norm(other - got) / np.linalg.norm(got) > 1e-2


@pytest.mark.parametrize("learned", [False, True])
def test_guidance_is_the_classifier_free_combination_of_two_passes(learned):
  model, params = tiny_model(out_ch=2 if learned else 1)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
  t, labels = jnp.array([3, 50, 99, 0]), jnp.array([1, 2, 3, 9])
  cond = model.apply({"params": params}, x, t, labels=labels)
  uncond = model.apply({"params": params}, x, t, labels=jnp.full((4,), 10))
  np.testing.assert_array_equal(model.apply({"params": params}, x, t), uncond)  # no labels: the null label
  assert np.abs(cond - uncond).max() > 1e-3
  for w in (0.0, 3.0):
    guided = sampling.unet_model_fn(model, params, labels, w)(x, t)
    np.testing.assert_allclose(guided[..., :1], (1 + w) * cond[..., :1] - w * uncond[..., :1], rtol=1e-5, atol=1e-5)
    if learned:  # the variance channels are the conditional pass's, unguided
      np.testing.assert_allclose(guided[..., 1:], cond[..., 1:], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="guidance_scale > 0 needs the labels"):
    sampling.unet_model_fn(model, params, None, 1.0)


def test_label_dropout_is_a_per_example_coin_at_the_configured_rate():
  model = unet.UNetTiny(num_classes=10, class_dropout=0.25)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(jnp.arange(8000))
  labels = jnp.arange(8000) % 10
  dropped = np.asarray(train_step.dropped_labels(model, labels, keys))
  null = dropped == model.null_label
  np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])  # the rest are kept as they were
  assert abs(null.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 8000)  # binomial: within 5 standard errors
  # Keyed per example: the first half's coins do not depend on the second half being in the batch.
  np.testing.assert_array_equal(train_step.dropped_labels(model, labels[:4000], keys[:4000]), dropped[:4000])
  off = unet.UNetTiny(num_classes=10)
  np.testing.assert_array_equal(train_step.dropped_labels(off, labels, keys), labels)


@pytest.mark.parametrize("method,num_steps", [("ancestral", 10), ("dpm_solver++", 4)])
def test_guided_sampling_on_8_devices_equals_one_guided_chain(method, num_steps):
  """Every sampler method runs guided: 8 devices give the chain of one device whose labels cycle (3, 7, 1) over
  the sample indices."""
  model, params = tiny_model()
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=0.2, num_timesteps=50))
  rng, labels = jax.random.PRNGKey(3), (3, 7, 1)
  per_sample = sampling.labels_of(labels, np.arange(16))
  np.testing.assert_array_equal(per_sample, [3, 7, 1] * 5 + [3])
  one = jax.jit(lambda p: sampling.sample_loop(sampling.unet_model_fn(model, p, jnp.asarray(per_sample), 2.0), d,
                                               rng, (16, 8, 8, 1), num_steps=num_steps, method=method))(params)
  replicated = jax.tree.map(lambda p: jnp.broadcast_to(p, (8,) + p.shape), params)
  many = sampling.sample_sharded(model, replicated, d, rng, 16, (8, 8, 1), num_steps=num_steps, method=method,
                                 labels=labels, guidance_scale=2.0)
  # 5e-5: w = 2 scales the float32 rounding differences between a forward of 32 and of 4 images by up to 1 + 2w.
  np.testing.assert_allclose(many, one, rtol=1e-5, atol=5e-5)
  unguided = sampling.sample_sharded(model, replicated, d, rng, 16, (8, 8, 1), num_steps=num_steps, method=method,
                                     labels=labels)
  assert np.abs(np.asarray(unguided) - np.asarray(many)).max() > 1e-3  # the scale is used


def test_conditional_training_resumes_bit_exactly_and_trains_the_label_embedding(tmp_path):
  def config(steps, grid_every=0):
    c = tiny_config(num_train_steps=steps)
    c.model.num_classes, c.model.class_dropout = 10, 0.2
    c.training.sample_every_steps, c.training.num_grid_samples = grid_every, 20
    return c
  straight = train.train_and_evaluate(config(4, grid_every=4), str(tmp_path / "straight"))
  train.train_and_evaluate(config(2), str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(config(4), str(tmp_path / "resumed"))
  assert_trees_equal(resumed, straight)
  fresh = train_step.create_train_state(jax.random.split(jax.random.PRNGKey(0), 3)[0], train_step.create_model(
      config(4)), train_step.create_optimizer(config(4).optim)[0], (8, 8, 1))
  assert max_rel_diff(straight.params["label_emb"], fresh.params["label_emb"]) > 1e-4
  assert os.path.isfile(tmp_path / "straight" / "samples" / "step_00000004.png")  # the class-by-class grid


def test_samples_are_written_with_their_labels(tmp_path):
  model, params = tiny_model()
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=0.2, num_timesteps=20))
  sampler = Sampler(method="ddim", num_steps=5, labels=tuple(range(10)), guidance_scale=1.0)
  assert sampler.tag(20) == "_ddim5_eta0.0_w1.0"
  assert dataclasses.replace(sampler, labels=(3,)).tag(20) == "_ddim5_eta0.0_w1.0_labels3"
  out = samples.write_sample_shards(model, params, d, sampler, jax.random.PRNGKey(0), 24, 16, (8, 8, 1),
                                    str(tmp_path / "s"))
  np.testing.assert_array_equal(samples.load_labels(out), np.arange(24) % 10)
  assert samples.load_samples(out).shape == (24, 8, 8, 1)


def _config(**fields):
  c = tiny_config()
  for key, value in fields.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


@pytest.mark.parametrize("mode,fields,message", [
    ("sample", dict(sampling__guidance_scale=2.0), "sampling.guidance_scale = 2.0: guidance needs a class-conditional"),
    ("sample", dict(model__num_classes=10, sampling__labels=(3, 12)), "sampling.labels = \\(3, 12\\): label 12 is not"),
    ("sample", dict(model__num_classes=10, sampling__labels=(-1,)), "sampling.labels = \\(-1,\\): item -1: out of"),
    ("train", dict(model__num_classes=10, model__class_dropout=1.0), "model.class_dropout = 1.0: out of range"),
])
def test_conditioning_config_mistakes_are_one_line_errors(mode, fields, message):
  with pytest.raises(ValueError, match=message) as e:
    config_checks.validate(_config(**fields), mode)
  assert "\n" not in str(e.value)


def test_distillation_rounds_condition_student_and_teacher_on_the_same_labels():
  from ddpm_jax import distillation  # pylint: disable=g-import-not-at-top
  model, teacher = tiny_model()
  student = jax.tree.map(lambda p: p * 1.01, teacher)
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=100))
  args = distillation.round_args(teacher, "eps", distillation.grid(100, 8), 4)
  images = jax.random.uniform(jax.random.PRNGKey(2), (6, 8, 8, 1), minval=-1, maxval=1)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(4), i))(jnp.arange(6))
  loss = lambda labels, args=args: float(distillation.RoundLoss()(model, student, (images, jnp.asarray(labels)),
                                                                  keys, keys[0], d, args))
  a, b = loss([0, 1, 2, 3, 4, 5]), loss([9, 8, 7, 6, 5, 4])
  assert np.isfinite(a) and abs(a - b) > 1e-3 * abs(a)  # the labels reach the networks
  null = loss([10] * 6)  # the null label: the unconditional round
  unlabelled = float(distillation.RoundLoss()(model, student, images, keys, keys[0], d, args))
  assert null == unlabelled
  # The padding that gives every round's points one shape is never drawn: unpadded points give the same loss.
  points, midpoints = distillation.round_points(distillation.grid(100, 8), 4)
  assert len(args.points) == 9 and len(points) == 5
  assert loss([0, 1, 2, 3, 4, 5], args._replace(points=points, midpoints=midpoints)) == a
