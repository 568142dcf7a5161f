"""The Colab notebooks run top to bottom on a CPU: smoke sizes, offline stand-ins, their figures written.

Each notebook runs in its own Jupyter kernel (the venv's python3) with DDPM_NOTEBOOK_SMOKE=1 and a temporary
DDPM_NOTEBOOK_WORKDIR; nbclient stops at the first cell that raises. The kernel is told it is offline
(HF_HUB_OFFLINE=1) and finds no prepared CIFAR-10 (an empty TFDS_DATA_DIR), so the pretrained notebook must take
its stand-in paths whatever the machine's network.
"""
import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from conftest import one_device_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
CELL_TIMEOUT = 600  # seconds per cell; the slowest smoke cell takes about a minute on a busy 2-core machine


def read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def run(name, tmp_path):
  """Executes the notebook in smoke mode; returns (workdir, all text it printed)."""
  nb = read(name)
  workdir = tmp_path / "work"
  env = dict(one_device_env(),  # one CPU device (conftest's 8 are for this process only)
             DDPM_NOTEBOOK_SMOKE="1", DDPM_NOTEBOOK_WORKDIR=str(workdir),
             HF_HUB_OFFLINE="1", TFDS_DATA_DIR=str(tmp_path / "tfds"))
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})  # the kernel's cwd, as in Jupyter
  client.execute(env=env)  # raises CellExecutionError at the first failing cell
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.output_type != "error", out
      text.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
  return workdir, "\n".join(text)


def image(path):
  with Image.open(path) as img:
    return np.asarray(img)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "pretrained.ipynb"])
def test_stored_clean_with_parameters_first(name):
  nb = read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "store the notebook without outputs"
  for parameter in ("REPO_URL", "RUNTIME", "SMOKE", "WORKDIR", "SAMPLE_STEPS"):
    assert f"\n{parameter} = " in code[0].source, parameter
  assert nb.metadata.kernelspec.name == "python3"


def test_quickstart_trains_and_draws_its_figures(tmp_path):
  workdir, text = run("quickstart.ipynb", tmp_path)
  assert "Trained 10 steps" in text
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  samples = image(workdir / "figures" / "samples.png")
  assert samples.std() > 0  # 16 samples of 8×8 in a 4×4 grid, enlarged
  for name in ("loss", "progressive", "trajectory"):
    assert image(workdir / "figures" / f"{name}.png").size > 0, name
  # Six samplers, a row of 8 each: ancestral, DDIM, Analytic-DPM, DPM-Solver++, SDE-DPM-Solver++, UniPC.
  assert "row 6: UniPC, 5 network passes" in text
  rows = image(workdir / "figures" / "samplers.png")
  assert rows.shape[0] > rows.shape[1] / 2 and rows.std() > 0
  assert "to t = 45, 40, 35, 30, 25, 20, 15, 10, 5, 0" in text  # T = 50, a frame every 5 steps


def test_pretrained_takes_the_stand_in_offline_and_measures(tmp_path):
  workdir, text = run("pretrained.ipynb", tmp_path)
  assert "STAND-IN: no internet" in text and "STAND-IN: meaningless" in text
  with open(workdir / "converted_stand_in" / "ddpm_config.json") as f:
    info = json.load(f)
  assert info["model"] == "cifar10" and info["config"]["diffusion.model_var_type"] == "fixedlarge"
  result = json.loads((workdir / "fid.json").read_text())
  assert result["stand_in"] and result["weights"] == "stand_in"
  assert result["num_samples"] == 8 and result["num_reference"] == 16
  assert math.isfinite(result["fid"]) and result["fid"] > 0
  for name in ("samples", "interpolation", "rate_distortion"):
    assert image(workdir / "figures" / f"{name}.png").std() > 0, name
  with open(workdir / "figures" / "rate_distortion.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["t"]) for r in rows] == [4, 3, 2, 1]  # CHAIN_STEPS = 4 in smoke mode, the paper's t
  assert all(math.isfinite(float(r["rate_bpd"])) for r in rows)
