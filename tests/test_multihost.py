"""Two processes on 127.0.0.1 (2 CPU devices each) train like one process: same params, shared checkpoints."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm_jax.modes import train
from conftest import assert_trees_equal, max_rel_diff, params_file, tiny_config, tiny_edit_config

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
LATE = 40  # seconds; well beyond the 30 s XLA:CPU gives processes to connect their collectives


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_STARTED = []  # every cluster process a test starts: none outlives its test (after a failure it would hog the CPU)


@pytest.fixture(autouse=True)
def _kill_leftover_processes():
  yield
  while _STARTED:
    p = _STARTED.pop()
    if p.poll() is None:
      p.kill()
      p.wait()


def _start_cluster(workdir, *actions, heartbeat_seconds=100):
  """Both processes of a cluster, each running the worker's actions ("train:N", "sample_eval:N") in turn."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), str(workdir), str(heartbeat_seconds), *actions],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
  _STARTED.extend(procs)
  return procs


def _wait(procs):
  """Each process's output (its log at INFO), once all have exited 0."""
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _params(workdir, step, pid):
  with np.load(params_file(workdir, step, pid)) as f:
    return [f[str(i)] for i in range(len(f.files))]


def _cluster_params(workdir, step):
  p0, p1 = _params(workdir, step, 0), _params(workdir, step, 1)
  assert_trees_equal(p0, p1)  # both hosts hold the same params
  return p0


def test_two_processes_train_evaluate_and_resume_like_one_process(tmp_path, caplog):
  """A 2-process run against one process (this test's 8 devices) over the same global batches, step by step.

  Checkpoints cross between them both ways: 2 processes → 1 at step 2, 1 → 2 at step 4, 2 → 2 at step 6. Process 1
  reaches the first train step LATE seconds after process 0 (a slow host), beyond XLA:CPU's 30 s to connect.
  """
  from ddpm_jax import diffusion as dlib
  from ddpm_jax import trained_params
  from ddpm_jax.evaluation import bpd
  from ddpm_jax.evaluation import samples
  from ddpm_jax.modes import sample as sample_mode
  from ddpm_jax.sampler import Sampler
  from ddpm_jax import input_pipeline
  from ddpm_jax.evaluation import fid
  from ddpm_jax.evaluation import inception
  from ddpm_jax.evaluation import inception_weights
  from ddpm_jax.modes import edit
  run, one = tmp_path / "run", tmp_path / "one"
  # Launch 1 trains steps 1-2 from scratch while this process trains the one-process reference to step 4, samples
  # and inpaints with it, draws the reference bits/dim of step 4 and trains on to step 8 (work for the ~40 s that
  # process 0 waits for the late process 1, in which the cluster uses no CPU).
  procs = _start_cluster(run, f"slow_compile:{LATE}", "train:2")
  single = {2: _leaves(train.train_and_evaluate(tiny_config(num_train_steps=2), str(one)))}
  config = tiny_config(num_train_steps=4)
  single[4] = _leaves(train.train_and_evaluate(config, str(one)))
  model, params, step = trained_params.load(config, str(one))
  one_samples = samples.load_samples(sample_mode.write_samples(config, model, params, step,
                                                               Sampler.from_config(config.sampling),
                                                               str(tmp_path / "samples")))
  with np.load(os.path.join(edit.run(tiny_edit_config(4), str(one)), "edited.npz")) as f:
    one_edit = dict(f)
  source = input_pipeline.make_source(config.data)
  want_bpd = bpd.bits_per_dim(model, flax_replicate(params), dlib.GaussianDiffusion.from_config(config.diffusion),
                                   np.stack([source[i] for i in range(6)]),
                                   jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 4))[1])
  for step in (6, 8):
    single[step] = _leaves(train.train_and_evaluate(tiny_config(num_train_steps=step), str(one)))
  _wait(procs)
  assert max_rel_diff(_cluster_params(run, 2), single[2]) <= 1e-6

  # The 2-process checkpoint restores in one process, which trains steps 3-4 like the reference.
  with caplog.at_level("INFO"):
    assert max_rel_diff(_leaves(train.train_and_evaluate(config, str(run))), single[4]) <= 1e-6
  assert "Starting at step 2 of 4" in caplog.text  # resumed (a fresh start would give the same params)

  # Launch 2 restores that 1-process checkpoint, evaluates it and inpaints with it, trains to 6, then restores its own
  # step 6 and trains to 8.
  ref_mu = np.random.default_rng(0).normal(size=fid.FEATURE_DIM)
  fid.save_stats(str(run / "ref_stats.npz"), ref_mu, np.eye(fid.FEATURE_DIM))
  procs = _start_cluster(run, "sample_eval:4", "edit:4", "train:6", "train:8")
  outs = _wait(procs)
  assert all("Starting at step 4 of 6" in out and "Starting at step 6 of 8" in out for out in outs)
  assert max_rel_diff(_cluster_params(run, 6), single[6]) <= 1e-6
  assert max_rel_diff(_cluster_params(run, 8), single[8]) <= 1e-5  # rounding grows with the steps: 1.8e-6 seen

  # Samples: each host wrote its half of every batch; together they are the one-process samples.
  cluster_dir = run / "samples" / "step_00000004"
  assert sorted(os.listdir(cluster_dir))[:4] == ["grid.png", "samples_00000_host0.npz", "samples_00000_host1.npz",
                                                 "samples_00001_host0.npz"]
  two = samples.load_samples(str(cluster_dir))
  assert two.shape == one_samples.shape == (16, 8, 8, 1)
  assert np.abs(two.astype(int) - one_samples.astype(int)).max() <= 1  # 8 vs 2 devices per batch: float rounding

  # Inpainting: each host edited its half of every batch; together they are the one-process edits, and the known
  # pixels are the inputs' exactly.
  edit_dir = run / "edit" / "step_00000004_inpaint_half_6_j2x3"
  assert sorted(os.listdir(edit_dir)) == ["edited.npz", "part_host0.npz", "part_host1.npz", "sheet.png"]
  with np.load(edit_dir / "part_host0.npz") as h0, np.load(edit_dir / "part_host1.npz") as h1:
    assert len(h0["index"]) and len(h1["index"])  # both hosts did a share, and together every image once
    assert sorted(np.concatenate([h0["index"], h1["index"]])) == list(range(12))
  with np.load(edit_dir / "edited.npz") as two_edit:
    np.testing.assert_array_equal(two_edit["arr_1"], one_edit["arr_1"])  # the same inputs
    np.testing.assert_array_equal(two_edit["arr_0"][:, :4], two_edit["arr_1"][:, :4])
    assert np.abs(two_edit["arr_0"].astype(int) - one_edit["arr_0"].astype(int)).max() <= 1

  # Bits/dim: per-host shards, read by process 0, equal the one-process bound per example.
  with open(run / "eval" / "results_step_00000004.json") as f:
    results = json.load(f)
  assert results["bpd"]["num_examples"] == 6
  for k, name in (("total", "value"), ("prior", "prior"), ("decoder", "decoder"), ("kl_terms", "kl_terms")):
    np.testing.assert_allclose(results["bpd"][name], np.mean(want_bpd[k]), rtol=1e-5, err_msg=k)

  # FID: both hosts ran Inception on their share of the sample shards; process 0's FID is that of all the samples.
  features = fid.compute_features(
      inception.make_feature_fn(inception_weights.load_inception_params(inception_weights.default_weights_path())),
      [samples.load_samples(str(run / "eval" / "samples_step_00000004"))], 16)
  assert results["fid"]["num_samples"] == 16
  np.testing.assert_allclose(results["fid"]["value"], fid.frechet_distance(
      *fid.stats_from_features(features["pool_3"]), ref_mu, np.eye(fid.FEATURE_DIM)), rtol=1e-5)


def flax_replicate(tree):
  import flax  # pylint: disable=g-import-not-at-top
  return flax.jax_utils.replicate(tree)


def test_a_dead_peer_stops_the_other_process_in_bounded_time(tmp_path):
  procs = _start_cluster(tmp_path, "train:100000", heartbeat_seconds=5)
  deadline = time.time() + 300
  while not os.path.isdir(tmp_path / "checkpoints" / "2") and time.time() < deadline:  # training is under way
    assert procs[0].poll() is None and procs[1].poll() is None
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  out = procs[0].communicate(timeout=120)[0]
  assert procs[0].returncode != 0, out[-2000:]
  assert time.time() - killed < 60, out[-2000:]  # not hung in a collective until the job's wall-clock limit
  assert os.path.isdir(tmp_path / "checkpoints" / "2")  # what was saved stays
