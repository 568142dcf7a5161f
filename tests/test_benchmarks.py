"""Each benchmark script runs end to end at its smallest settings (--quick, tiny model) and prints its headline."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the benchmarks compare against PyTorch (the test extra)")
pytest.importorskip("diffusers", reason="the benchmarks compare against diffusers (the test extra)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("bench_train.py", "bench_sample.py", "bench_memory.py", "profile_train.py", "bench_conv_grad.py")


@pytest.fixture(scope="module")
def outputs():
  """script → its stdout lines. They run at once: most of their time is imports and single-threaded compiles."""
  # One CPU device (conftest asks for 8); no LLVM optimisation: this checks that the scripts work, not their speed.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  procs = {s: subprocess.Popen([sys.executable, os.path.join("benchmarks", s), "--quick"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in SCRIPTS}
  result = {}
  for script, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{err[-3000:]}"
    result[script] = out.strip().splitlines()
  return result


def test_bench_train_quick(outputs):
  lines = outputs["bench_train.py"]
  m = re.fullmatch(r"train step diffusers ÷ ours: (\d+\.\d+) at batch 2 \(target ≥ 1\.3\)", lines[-1])
  assert m and float(m.group(1)) > 0, lines[-1]
  flops = re.search(r"(\d+\.\d+) GFLOP/step", "\n".join(lines))
  assert flops and float(flops.group(1)) > 0  # XLA's cost analysis gave a FLOP count


def test_bench_sample_quick(outputs):
  lines = outputs["bench_sample.py"]
  m = re.fullmatch(r"chain ÷ \(steps × forward\) = (\d+\.\d+) \(target ≤ 1\.03\); sampling throughput ours ÷ "
                   r"DDPMPipeline = (\d+\.\d+) \(target ≥ 1\.5\)", lines[-1])
  assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, lines[-1]


def test_bench_memory_quick(outputs):
  lines = outputs["bench_memory.py"]
  m = re.fullmatch(r"peak RSS ÷ PyTorch: ours (\d+\.\d+), ours_remat (\d+\.\d+) \(targets: .*\)", lines[-1])
  assert m, lines[-1]
  rows = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in lines
          if re.match(r"\| (ours|diff)", row)}
  assert set(rows) == {"ours", "ours_remat", "diffusers"}
  for name, (peak, base, _, first, later, tensorflow, _) in rows.items():
    assert 100 < float(peak) < 20_000, (name, peak)  # MiB: a real process, not a unit slip
    assert float(base) <= float(first) <= float(peak) and float(later) <= float(peak), (name, rows[name])
    assert tensorflow == "no", name  # the train step alone keeps TensorFlow out of the process


def test_profile_train_quick(outputs):
  lines = outputs["profile_train.py"]
  assert re.fullmatch(r"largest gap: .+, [+-]\d+\.\d+ s/step of ours − PyTorch's [+-]\d+\.\d+ s/step in all",
                      lines[-1]), lines[-1]
  rows = {row.split("|")[1].strip(): row.split("|")[2:-1] for row in lines if row.startswith("| ")}
  assert float(rows["total"][0]) > 0 and float(rows["total"][2]) > 0
  assert float(rows["conv forward"][0]) > 0 and float(rows["conv backward (both)"][2]) > 0  # both profiles were read


def test_bench_conv_grad_quick(outputs):
  lines = outputs["bench_conv_grad.py"]
  m = re.fullmatch(r"weight gradient, XLA ÷ 9 matmuls: (\d+\.\d+) at 2×8²×16→16", lines[-1])
  assert m and float(m.group(1)) > 0, lines[-1]


def test_profile_classes_of_a_convolutions_gradients():
  """The profile's HLO classes on a program whose convolutions are known: one of each kind."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import jax  # pylint: disable=g-import-not-at-top
  import profile_train  # pylint: disable=g-import-not-at-top

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y ** 2).sum()
  x, w = jax.numpy.ones((2, 8, 8, 4)), jax.numpy.ones((3, 3, 4, 4))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  classes = profile_train.classify_hlo(hlo)
  convs = sorted(c for c in classes.values() if c.startswith("conv"))
  assert convs.count("conv forward") >= 1 and "conv input grad" in convs and "conv weight grad" in convs, convs


def test_profile_of_one_forward_pass_on_the_tiny_model():
  """--forward: both frameworks' forward calls run and our profile finds the forward convolutions, nothing else."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import common  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import profile_train  # pylint: disable=g-import-not-at-top
  ours, params, theirs, size = common.matched_models("tiny")
  batch = np.random.default_rng(0).uniform(-1, 1, size=(2, size, size, 3)).astype(np.float32)
  call_ours, call_theirs = common.ours_forward(ours, params, batch), common.torch_forward(theirs, batch)
  call_theirs()
  seconds, wall = profile_train.profile_ours(call_ours, 2)
  assert wall > 0 and seconds["conv forward"] > 0
  assert not {"conv input grad", "conv weight grad"} & set(seconds), seconds  # a forward pass has no gradients
