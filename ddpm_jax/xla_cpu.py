"""The one XLA:CPU flag ddpm-jax sets: which ops XLA hands to the YNNPACK library.

jaxlib 0.10's XLA:CPU gives YNNPACK three kinds of op by default: convolutions, single matmuls and reductions. On the
U-Net its reductions (GroupNorm's means and variances, the attention softmax) are slow, 5.7× PyTorch's time in a
sampling step's profile, and single matmuls miss the layout changes around them. ddpm-jax asks instead for
convolutions and matmul fusions (a matmul with the reshapes beside it), and leaves reductions to XLA's own code:
`--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot`. Measured side by side on 2 CPU cores
(docs/performance.md): the digits U-Net's forward pass at batch 256, what every sampler runs, 1.75× faster; its
train step 1.09×; the CIFAR-10 U-Net's forward at batch 8 about 1.05×. Outputs and gradients agree with XLA's
default to float rounding (tests/test_xla_cpu.py). TPUs and GPUs ignore the flag.

main.py and the benchmarks call `apply` before JAX starts its backend. The option is experimental in XLA, so it is
added only on the jaxlib releases it was measured on, and never over a setting of it already in XLA_FLAGS (the test
suite sets XLA's default there, so it compiles what it always did).
"""
import os

OPTION = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{OPTION}=individual_convolution,dot"
XLA_DEFAULT = f"--{OPTION}=individual_convolution,individual_dot,reduce"  # jaxlib 0.10's own list
MEASURED_ON = ("0.10.",)  # jaxlib release series the flag was measured on


def compiler_options(flag):
  """A FLAG-style `--OPTION=a,b` as the compiler options of one compile: {OPTION: 'LIBRARY_FUSION_TYPE_A,…'}."""
  names = flag.split("=", 1)[1].split(",")
  return {OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{name.upper()}" for name in names)}


def tuned(xla_flags, jaxlib_version):
  """xla_flags with FLAG added, unless they already set OPTION or jaxlib_version is not one it was measured on."""
  if OPTION in xla_flags or not jaxlib_version.startswith(MEASURED_ON):
    return xla_flags
  return f"{xla_flags} {FLAG}".strip()


def apply():
  """Adds FLAG to this process's XLA_FLAGS (its children inherit them). Call before JAX first uses a device."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  os.environ["XLA_FLAGS"] = tuned(os.environ.get("XLA_FLAGS", ""), version)
