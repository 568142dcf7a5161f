"""Two processes on 127.0.0.1 (2 CPU devices each) train like one process: same params, shared checkpoints."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from ddpm_jax import train
from test_train import max_rel_diff, tiny_config

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cluster_run(workdir, steps):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), str(workdir), str(steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]


def _params(workdir, pid):
  with np.load(os.path.join(workdir, f"final_params_process{pid}.npz")) as f:
    return [f[str(i)] for i in range(len(f.files))]


def test_two_process_cluster_matches_one_process_and_resumes(tmp_path):
  # 2 steps on the cluster, then 2 more after a restart: the checkpoint written by 2 processes restores on both.
  _cluster_run(tmp_path / "cluster", 2)
  _cluster_run(tmp_path / "cluster", 4)
  p0, p1 = _params(tmp_path / "cluster", 0), _params(tmp_path / "cluster", 1)
  for a, b in zip(p0, p1):
    np.testing.assert_array_equal(a, b)  # both hosts hold the same params
  # One process with this test's 8 devices over the same global batches (t, ε keyed per example slot).
  single = train.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path / "single"))
  assert max_rel_diff(p0, jax.tree.leaves(single.params)) <= 1e-6
  # The cluster's checkpoint restores in one process and training continues.
  resumed = train.train_and_evaluate(tiny_config(num_train_steps=6), str(tmp_path / "cluster"))
  assert int(resumed.step) == 6
