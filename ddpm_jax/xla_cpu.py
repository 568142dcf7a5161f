"""The one XLA:CPU flag ddpm-jax sets: which ops XLA hands to the YNNPACK library, for small models.

jaxlib 0.10's XLA:CPU gives YNNPACK three kinds of op by default: convolutions, single matmuls and reductions. On the
digits demo's small U-Net its reductions (GroupNorm's means and variances, the attention softmax) are slow and single
matmuls miss the layout changes around them, so ddpm-jax asks instead for convolutions and matmul fusions (a matmul
with the reshapes beside it) and leaves reductions to XLA's own code:
`--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot`. Measured side by side on 2 CPU cores
(docs/performance.md): the digits U-Net's forward pass at batch 256, what every sampler runs, 1.7× faster on two AMD
EPYCs; its train step 1.1–1.2×. On the CIFAR-10 U-Net, whose feature maps are 64× larger, the same flag made the
train step 7–23% slower (the backward pass's reductions are faster in YNNPACK there) and its forward pass 1% slower
to 19% faster (two CPUs, noisy). So `apply` adds it only for models whose largest feature map per image, image_size²
× ch, is at most SMALL_MODEL; larger models keep XLA's default. Outputs and gradients agree with XLA's default to
float rounding (tests/test_xla_cpu.py). TPUs and GPUs ignore the flag.

main.py calls `apply(config)` before JAX starts its backend. The option is experimental in XLA, so it is added only on
the jaxlib releases it was measured on, and never over a setting of it already in XLA_FLAGS (the test suite sets
XLA's default there, so it compiles what it always did).
"""
import os

OPTION = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{OPTION}=individual_convolution,dot"
XLA_DEFAULT = f"--{OPTION}=individual_convolution,individual_dot,reduce"  # jaxlib 0.10's own list
MEASURED_ON = ("0.10.",)  # jaxlib release series the flag was measured on
# The largest feature map per image (image_size² × model.ch) the flag is added for. The two models measured lie on
# either side: the digits demo's 8² × 32 = 2,048 gains, CIFAR-10's 32² × 128 = 131,072 loses; the bound sits between
# them (16² × 64), where nothing has been measured.
SMALL_MODEL = 16 * 16 * 64


def compiler_options(flag):
  """A FLAG-style `--OPTION=a,b` as the compiler options of one compile: {OPTION: 'LIBRARY_FUSION_TYPE_A,…'}."""
  names = flag.split("=", 1)[1].split(",")
  return {OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{name.upper()}" for name in names)}


def tuned(xla_flags, jaxlib_version):
  """xla_flags with FLAG added, unless they already set OPTION or jaxlib_version is not one it was measured on."""
  if OPTION in xla_flags or not jaxlib_version.startswith(MEASURED_ON):
    return xla_flags
  return f"{xla_flags} {FLAG}".strip()


def pays_for(image_size, ch):
  """Whether FLAG is measured to pay for a U-Net on image_size² images with base channel count ch."""
  return image_size * image_size * ch <= SMALL_MODEL


def apply(config=None):
  """Adds FLAG to this process's XLA_FLAGS (its children inherit them) if it pays for config's model (a ddpm-jax
  config; None: add it). Call before JAX first uses a device."""
  if config is not None and not pays_for(config.data.image_size, config.model.ch):
    return
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  os.environ["XLA_FLAGS"] = tuned(os.environ.get("XLA_FLAGS", ""), version)
