"""The commands the README, docs/ and config docstrings show are real: they parse, and the offline ones run."""
import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, abstract, one_device_env, shown_commands, tf_names, write_tf1_checkpoint

MAIN_COMMANDS = shown_commands("python main.py")


def test_the_docs_show_the_commands_we_expect():
  files = {f for f, _ in MAIN_COMMANDS}
  assert {"README.md", "docs/evaluation.md", "docs/pretrained.md", "configs/cifar10.py"} <= files
  assert len(MAIN_COMMANDS) >= 12
  assert len(shown_commands("python -m ddpm_jax.convert")) >= 3


def _as_json(flag_value):
  """A flag's value as the worker's JSON shows it (a Python tuple literal becomes a list)."""
  try:
    return json.loads(flag_value)
  except ValueError:
    return json.loads(json.dumps(ast.literal_eval(flag_value)))


def test_every_main_command_parses_with_the_config_it_names():
  argvs = [argv for _, argv in MAIN_COMMANDS]
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "commands_worker.py"), "--parse"], cwd=REPO,
                        input=json.dumps(argvs), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for (path, argv), result in zip(MAIN_COMMANDS, results):
    assert result["ok"], f"{path}: {' '.join(argv)}: {result.get('error')}"
    for arg in argv:  # each --config.a.b=v override took effect
      m = re.fullmatch(r"--config\.([\w.]+)=(.*)", arg)
      if m:
        node = result["config"]
        for key in m.group(1).split("."):
          node = node[key]
        assert str(node) == m.group(2) or node == _as_json(m.group(2)), (path, arg, node)


def test_the_documented_tf_conversion_runs(tmp_path):
  """README/docs: `python -m ddpm_jax.convert --from=tf --input=diffusion_cifar10_model/model.ckpt-790000 …`."""
  from ddpm_jax.models import unet
  commands = [argv for _, argv in shown_commands("python -m ddpm_jax.convert") if "--from=tf" in argv]
  assert commands
  source = [a.split("=", 1)[1] for a in commands[0] if a.startswith("--input=")][0]
  write_tf1_checkpoint(str(tmp_path / source), tf_names(abstract(unet.UNetCIFAR10(), 32)))
  for argv in {tuple(a) for a in commands}:
    proc = subprocess.run([sys.executable, "-m", "ddpm_jax.convert", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = [a.split("=", 1)[1] for a in argv if a.startswith("--output=")][0]
    assert sorted(os.listdir(tmp_path / output)) == ["ddpm_config.json", "params"]
    assert "Sample with: python main.py --config=configs/cifar10.py" in proc.stdout


@pytest.mark.parametrize("argv", [a for _, a in shown_commands("python -m ddpm_jax.convert") if "--from=diffusers" in a])
def test_the_documented_diffusers_conversion_parses(tmp_path, argv):
  proc = subprocess.run([sys.executable, "-m", "ddpm_jax.convert", *argv], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  # No download here: the flags parse and the converter reports the missing input in one line.
  assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("convert: ")
  assert "not found" in proc.stderr and "Flags parsing error" not in proc.stderr


def python_blocks(path):
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_api_page_example_runs():
  (block,) = python_blocks("docs/api.md")
  proc = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(one_device_env(), PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"loss \d+\.\d+; samples \(4, 16, 16, 1\) in \[-?\d", proc.stdout), proc.stdout


def test_the_readme_library_example_runs_as_written():
  (block,) = python_blocks("README.md")
  proc = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(one_device_env(), PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  shape, lo, hi = re.fullmatch(r"\((\d+), (\d+), (\d+), (\d+)\) (\S+) (\S+)", proc.stdout.strip()).group(1, 5, 6)
  assert shape == "4" and -1.0 <= float(lo) < float(hi) <= 1.0, proc.stdout


def test_every_config_field_is_documented():
  import importlib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "docs", "configs.md"), encoding="utf-8") as f:
    documented = set(re.findall(r"^\| `([\w.]+)` \|", f.read(), re.M))
  names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))]
  for name in sorted(set(names) - {"__init__"}):
    config = importlib.import_module(f"configs.{name}").get_config()
    fields = set(flax.traverse_util.flatten_dict(config.to_dict(), sep="."))
    assert fields <= documented, f"configs/{name}.py fields missing from docs/configs.md: {sorted(fields - documented)}"
  assert len(documented) >= 59
