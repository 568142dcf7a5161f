"""Each benchmark script runs end to end at its smallest settings (--quick, tiny model) and prints its headline."""
import json
import os
import re
import subprocess
import sys

import pytest

import scripts_worker
from conftest import REPO, one_device_env

pytest.importorskip("torch", reason="the benchmarks compare against PyTorch (the test extra)")
pytest.importorskip("diffusers", reason="the benchmarks compare against diffusers (the test extra)")
# The Python scripts, run from the repository's root one after another in one process (tests/scripts_worker.py),
# bench_train.py first: most of their time is compiling the tiny model's train step and chains, which the later
# scripts then read from the suite's compilation cache (all at once, each compiled them anew: 140 against 100 CPU-s).
SCRIPTS = [[os.path.join("benchmarks", s), "--quick"]
           for s in ("bench_train.py", "bench_sample.py", "bench_memory.py", "profile_train.py", "bench_conv_grad.py",
                     "bench_conv_impl.py")]


@pytest.fixture(scope="module")
def outputs():
  """name → its stdout lines: each Python script's, then accelerator.sh --tiny's (a shell script, its own process)."""
  # One CPU device (conftest asks for 8), the suite's compile flags: this checks that the scripts work, not their
  # speed. PYTHON: the interpreter accelerator.sh runs (this one, whatever the PATH).
  env = dict(one_device_env(), PYTHON=sys.executable)
  proc = subprocess.run([sys.executable, os.path.join("tests", "scripts_worker.py")], input=json.dumps(SCRIPTS),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
  result, name = {}, None
  for line in proc.stdout.strip().splitlines():
    if line.startswith(scripts_worker.MARK):
      name = os.path.basename(line[len(scripts_worker.MARK):])
      result[name] = []
    else:
      result[name].append(line)
  assert list(result) == [os.path.basename(argv[0]) for argv in SCRIPTS], list(result)
  proc = subprocess.run(["bash", os.path.join("benchmarks", "accelerator.sh"), "--tiny"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"accelerator.sh failed:\n{proc.stderr[-3000:]}"
  result["accelerator.sh"] = proc.stdout.strip().splitlines()
  return result


def test_bench_train_quick(outputs):
  lines = outputs["bench_train.py"]
  m = re.fullmatch(r"train step diffusers ÷ ours: (\d+\.\d+) at batch 2 \(target ≥ 1\.0; long-run goal ≥ 1\.3\)",
                   lines[-1])
  assert m and float(m.group(1)) > 0, lines[-1]
  assert any("ddpm-jax, XLA's YNNPACK default" in row for row in lines), lines  # timed beside ours on a CPU
  flops = re.search(r"(\d+\.\d+) GFLOP/step", "\n".join(lines))
  assert flops and float(flops.group(1)) > 0  # XLA's cost analysis gave a FLOP count


def test_bench_sample_quick(outputs):
  lines = outputs["bench_sample.py"]
  m = re.fullmatch(r"chain ÷ \(steps × forward\) = (\d+\.\d+) \(target ≤ 1\.03\); sampling throughput ours ÷ "
                   r"DDPMPipeline = (\d+\.\d+) \(target ≥ 1\.0; long-run goal ≥ 1\.5\)", lines[-1])
  assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, lines[-1]
  # On a CPU the chain also ran with XLA's own choice of YNNPACK ops, side by side: its own rows, real numbers.
  xla = {row.split("|")[1].strip(): row.split("|")[2:-1] for row in lines if "XLA's" in row}
  assert set(xla) == {"ddpm-jax, XLA's YNNPACK default", "ours with XLA's default ÷ diffusers"}, lines
  assert float(xla["ddpm-jax, XLA's YNNPACK default"][0]) > 0
  assert float(xla["ours with XLA's default ÷ diffusers"][2]) > 0


def test_bench_memory_quick(outputs):
  lines = outputs["bench_memory.py"]
  m = re.fullmatch(r"peak RSS ÷ PyTorch: ours (\d+\.\d+) \(targets: .*\)", lines[-1])  # --quick: no remat
  assert m and float(m.group(1)) > 0, lines[-1]
  rows = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in lines
          if re.match(r"\| (ours|diff)", row)}
  assert set(rows) == {"ours", "diffusers"}
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


def test_bench_conv_impl_quick(outputs):
  lines = outputs["bench_conv_impl.py"]
  m = re.fullmatch(r"forward \+ both gradients, XLA ÷ conv3x3: (\d+\.\d+) at 2×8²×16→16", lines[-1])
  assert m and float(m.group(1)) > 0, lines[-1]
  row = next(r for r in lines if r.startswith("| 2×8²×16→16"))
  cells = [c.strip() for c in row.split("|")[2:-1]]
  assert len(cells) == 10 and all(float(c.split()[0]) >= 0 for c in cells[:2] + cells[4:]), cells  # every form timed


def test_accelerator_tiny(outputs):
  """accelerator.sh --tiny: every figure of the summary table parses and is > 0, on both sides."""
  lines = outputs["accelerator.sh"]
  assert re.fullmatch(r"device: .+; whole run \d+ s \(budget 8 min\)", lines[-1]), lines[-1]
  start = next(i for i, l in enumerate(lines) if l.startswith("summary: "))
  rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in lines[start + 3:] if r[:1] == "|"}
  assert len(rows) == 10 and any(n.startswith("train steps/s, batch 2, bfloat16") for n in rows), list(rows)
  assert any(n.startswith("images/s, 4-step DPM-Solver++") for n in rows), list(rows)
  for name, cells in rows.items():
    assert len(cells) == 3 and all(float(c) > 0 for c in cells), (name, cells)  # ours, PyTorch, their ratio


def test_digits_model_is_the_demos():
  """common.MODELS['digits'] is configs/digits.py's U-Net and images."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import common  # pylint: disable=g-import-not-at-top
  fields, size, channels = common.MODELS["digits"]
  config = common.train_config("digits")
  assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model.items() if k in fields} == fields
  assert (size, channels) == (config.data.image_size, config.data.channels) == (8, 1)


def test_benchmarks_compile_each_model_as_main_py_does():
  """main.py leaves the YNNPACK flag off for CIFAR-10-sized models (xla_cpu.apply): the benchmarks' compiles of
  them get XLA's own list, the small models keep the flag."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import common  # pylint: disable=g-import-not-at-top
  from ddpm_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  assert common.main_py_options("cifar10") == xla_cpu.compiler_options(xla_cpu.XLA_DEFAULT)  # the suite runs on CPU
  assert common.main_py_options("digits") is None and common.main_py_options("digits16") is None
  assert common.main_py_options("tiny") is None


def test_benchmarks_read_config_overrides_as_main_py_does():
  """--config.<field>=<value> after a benchmark's --config reaches the config it loads, parsed by ml_collections as
  main.py's are; a field the config lacks and any other unknown argument are errors."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import argparse  # pylint: disable=g-import-not-at-top
  import common  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, "configs", "digits.py")
  plain = common.load_config(path)
  config = common.load_config(path, ["--config.diffusion.model_mean_type=v", "--config.model.ch_mult=(1,2)",
                                     "--config.sampling.eta=0.5"])
  assert plain.diffusion.model_mean_type == "eps" and config.diffusion.model_mean_type == "v"
  assert tuple(config.model.ch_mult) == (1, 2) and config.sampling.eta == 0.5
  assert config.training.num_train_steps == plain.training.num_train_steps  # the rest as the file says
  with pytest.raises(Exception, match="no_such_field"):
    common.load_config(path, ["--config.model.no_such_field=1"])

  parser = argparse.ArgumentParser()
  parser.add_argument("--config")
  args, overrides = common.parse_args_and_config_overrides(parser, [f"--config={path}", "--config.seed=3"])
  assert args.config == path and overrides == ["--config.seed=3"]
  assert common.load_config(args.config, overrides).seed == 3
  with pytest.raises(SystemExit):
    common.parse_args_and_config_overrides(parser, [f"--config={path}", "--seed=3"])


def test_conv_impl_shapes_flag_reads_batch_side_in_out():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import argparse  # pylint: disable=g-import-not-at-top
  import bench_conv_impl  # pylint: disable=g-import-not-at-top
  assert bench_conv_impl._shape("64x16x96x32") == (64, 16, 96, 32)  # pylint: disable=protected-access
  for bad in ("64x16x96", "64x16x96x0", "64x16xax32"):
    with pytest.raises(argparse.ArgumentTypeError, match="expected batch x side x in x out"):
      bench_conv_impl._shape(bad)  # pylint: disable=protected-access


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
  import profile_train  # pylint: disable=g-import-not-at-top
  ours, params, theirs, size = common.matched_models("tiny")
  batch = common.random_batch("tiny", 2)
  call_ours, call_theirs = common.ours_forward(ours, params, batch), common.torch_forward(theirs, batch)
  call_theirs()
  seconds, wall = profile_train.profile_ours(call_ours, 2)
  assert wall > 0 and seconds["conv forward"] > 0
  assert not {"conv input grad", "conv weight grad"} & set(seconds), seconds  # a forward pass has no gradients
