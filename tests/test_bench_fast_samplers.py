"""benchmarks/bench_fast_samplers.py --tiny end to end: a 2-step model trained in the script, both sides, the table,
the goal lines, the CSV and the figure."""
import csv
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, one_device_env

pytest.importorskip("torch", reason="the benchmark compares against PyTorch (the test extra)")
pytest.importorskip("diffusers", reason="the benchmark compares against diffusers (the test extra)")


def test_bench_fast_samplers_tiny(tmp_path):
  # One CPU device (conftest asks for 8): the script's own setting when run by hand. The suite's compile flags:
  # its Inception passes run slower with them, but its compiles save more (84–87 against 92–100 CPU-s,
  # docs/performance.md).
  env = one_device_env()
  out = tmp_path / "bench"
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_fast_samplers.py"), "--tiny",
                         f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  header = next(l for l in lines if l.startswith("| side |"))
  assert [c.strip() for c in header.split("|")[1:-1]] == ["side", "sampler", "FID@5", "FID@10", "s/sample@10"]
  rows = {(c[0], c[1]): c[2:] for c in ([x.strip() for x in l.split("|")[1:-1]] for l in lines
                                        if re.match(r"\| (ours|diffusers) \|", l))}
  assert set(rows) == {("ours", "Analytic-DPM"), ("ours", "DPM-Solver++ 2M"), ("diffusers", "DDPMScheduler"),
                       ("diffusers", "DPMSolverMultistep 2M")}
  for cells in rows.values():
    assert all(float(c) > 0 for c in cells), cells  # every FID and the time were measured
  goals = [l for l in lines if l.startswith("goal:")]
  assert len(goals) == 4 and all(l.endswith(("PASS", "MISS")) for l in goals), goals  # 5, 10, vs reference, time

  with open(f"{out}.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["side"] for r in table] == ["ours", "ours", "diffusers", "diffusers", "reference"]
  for r in table[:4]:
    assert float(r["fid_5"]) > 0 and float(r["fid_10"]) > 0 and float(r["s_per_sample_10"]) > 0, r
  assert os.path.getsize(f"{out}.png") > 1000
