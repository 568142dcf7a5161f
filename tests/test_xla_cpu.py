"""The XLA:CPU flag main.py sets (ddpm_jax/xla_cpu.py): when it is added, and that it computes the same U-Net."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import xla_cpu
from ddpm_jax.models import unet
from conftest import perturbed


def test_the_flag_is_added_only_on_measured_jaxlibs_and_never_over_the_users():
  assert xla_cpu.tuned("", "0.10.2") == xla_cpu.FLAG
  assert xla_cpu.tuned("--xla_force_host_platform_device_count=8", "0.10.7") == (
      "--xla_force_host_platform_device_count=8 " + xla_cpu.FLAG)
  assert xla_cpu.tuned("", "0.11.0") == "" and xla_cpu.tuned("", "0.9.1") == ""  # not measured there
  mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  assert xla_cpu.tuned(mine, "0.10.2") == mine


def test_apply_sets_the_environment_once(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.setattr("importlib.metadata.version", lambda name: "0.10.2")
  xla_cpu.apply()
  xla_cpu.apply()  # a second call (a library user's, say) adds nothing
  import os  # pylint: disable=g-import-not-at-top
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false " + xla_cpu.FLAG


def test_apply_adds_the_flag_for_the_digits_models_and_not_for_cifar10s(monkeypatch):
  """Measured: the flag speeds up the digits U-Net (8² × 32) and slows down CIFAR-10's train step (32² × 128)."""
  from configs import cifar10, digits, digits_long  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr("importlib.metadata.version", lambda name: "0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "")
  xla_cpu.apply(cifar10.get_config())
  assert os.environ["XLA_FLAGS"] == ""
  for config in (digits.get_config(), digits_long.get_config()):
    monkeypatch.setenv("XLA_FLAGS", "")
    xla_cpu.apply(config)
    assert os.environ["XLA_FLAGS"] == xla_cpu.FLAG
  assert xla_cpu.pays_for(16, 64) and not xla_cpu.pays_for(16, 128) and not xla_cpu.pays_for(256, 128)


def test_the_flags_ops_compute_the_same_unet():
  """Compiled as the flag asks (as compiler options), the U-Net's outputs and gradients equal those compiled with
  XLA's default to float rounding; and the option took effect (more of the program runs in YNNPACK fusions)."""
  if jax.default_backend() != "cpu":
    pytest.skip("an XLA:CPU option")
  options = xla_cpu.compiler_options(xla_cpu.FLAG)
  assert options == {xla_cpu.OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_DOT"}
  model = unet.UNetTiny()
  x, t = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)), jnp.array([3, 700])
  params = perturbed(jax.jit(model.init)(jax.random.PRNGKey(1), x, t)["params"], 0.02)
  forward = jax.jit(lambda p: model.apply({"params": p}, x, t)).lower(params)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t) ** 2))).lower(params)
  flat = lambda tree: np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])
  for lowered in (forward, grad):
    default, flagged = lowered.compile(), lowered.compile(compiler_options=options)
    assert default.as_text() != flagged.as_text()
    a, b = flat(default(params)), flat(flagged(params))
    assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a)  # 1.2e-7 seen
