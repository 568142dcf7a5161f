"""Two processes on 127.0.0.1 (2 CPU devices each) train like one process: same params, shared checkpoints."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from ddpm_jax import train
from test_train import max_rel_diff, tiny_config

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_cluster(workdir, *actions, heartbeat_seconds=100):
  """Both processes of a cluster, each running the worker's actions ("train:N", "sample_eval:N") in turn."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return [subprocess.Popen([sys.executable, WORKER, str(port), str(i), str(workdir), str(heartbeat_seconds), *actions],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]


def _cluster_run(workdir, *actions):
  procs = _start_cluster(workdir, *actions)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]


def eval_config(config, workdir):
  """FID of 16 samples against fixed statistics in workdir (Inception on every host) and bits/dim of 6 examples."""
  config.eval.num_samples, config.eval.figures = 16, False
  config.eval.ref_stats = os.path.join(workdir, "ref_stats.npz")  # the digits' own statistics would cost minutes
  config.eval.bpd_num_examples, config.eval.bpd_batch_size = 6, 4
  return config


def _params(workdir, pid):
  with np.load(os.path.join(workdir, f"final_params_process{pid}.npz")) as f:
    return [f[str(i)] for i in range(len(f.files))]


def test_two_process_cluster_matches_one_process_and_resumes(tmp_path):
  # 2 steps on the cluster, then 2 more after a restart: the checkpoint written by 2 processes restores on both.
  _cluster_run(tmp_path / "cluster", "train:2")
  _cluster_run(tmp_path / "cluster", "train:4")
  p0, p1 = _params(tmp_path / "cluster", 0), _params(tmp_path / "cluster", 1)
  for a, b in zip(p0, p1):
    np.testing.assert_array_equal(a, b)  # both hosts hold the same params
  # One process with this test's 8 devices over the same global batches (t, ε keyed per example slot).
  single = train.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path / "single"))
  assert max_rel_diff(p0, jax.tree.leaves(single.params)) <= 1e-6
  # The cluster's checkpoint restores in one process and training continues.
  resumed = train.train_and_evaluate(tiny_config(num_train_steps=6), str(tmp_path / "cluster"))
  assert int(resumed.step) == 6


def test_one_process_checkpoint_samples_evaluates_and_trains_on_two_processes(tmp_path):
  from ddpm_jax import diffusion as dlib
  from ddpm_jax import evaluate
  from ddpm_jax import generate
  from ddpm_jax import input_pipeline
  from ddpm_jax.evaluation import fid
  from ddpm_jax.evaluation import inception
  from ddpm_jax.evaluation import inception_weights
  train.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path / "run"))
  shutil.copytree(tmp_path / "run", tmp_path / "copy")
  ref_mu = np.random.default_rng(0).normal(size=fid.FEATURE_DIM)
  fid.save_stats(str(tmp_path / "run" / "ref_stats.npz"), ref_mu, np.eye(fid.FEATURE_DIM))
  # One launch: evaluate the 1-process checkpoint, then train on from it to step 6 (checked at the end).
  _cluster_run(tmp_path / "run", "sample_eval:4", "train:6")

  # Samples: each host wrote its half of every batch; together they are the one-process samples.
  config = tiny_config(num_train_steps=4)
  cluster_dir = tmp_path / "run" / "samples" / "step_00000004"
  assert sorted(os.listdir(cluster_dir))[:4] == ["grid.png", "samples_00000_host0.npz", "samples_00000_host1.npz",
                                                 "samples_00001_host0.npz"]
  one = generate.load_samples(generate.sample_to_dir(config, str(tmp_path / "copy"), out_dir=str(tmp_path / "one")))
  two = generate.load_samples(str(cluster_dir))
  assert two.shape == one.shape == (16, 8, 8, 1)
  assert np.abs(two.astype(int) - one.astype(int)).max() <= 1  # 8 vs 2 devices per batch: float rounding only

  # Bits/dim: per-host shards, read by process 0, equal the one-process bound per example.
  model, params, _ = generate.load_ema_params(config, str(tmp_path / "copy"))
  source = input_pipeline.make_source(config.data)
  want = evaluate.bits_per_dim(model, flax_replicate(params), dlib.GaussianDiffusion.from_config(config.diffusion),
                               np.stack([source[i] for i in range(6)]),
                               jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 4))[1])
  with open(tmp_path / "run" / "eval" / "results_step_00000004.json") as f:
    got = json.load(f)["bpd"]
  assert got["num_examples"] == 6
  for k, name in (("total", "value"), ("prior", "prior"), ("decoder", "decoder"), ("kl_terms", "kl_terms")):
    np.testing.assert_allclose(got[name], np.mean(want[k]), rtol=1e-5, err_msg=k)

  # FID: both hosts ran Inception on their share of the sample shards; process 0's FID is that of all the samples.
  eval_samples = str(tmp_path / "run" / "eval" / "samples_step_00000004")
  features = fid.compute_features(
      inception.make_feature_fn(inception_weights.load_inception_params(inception_weights.default_weights_path())),
      [generate.load_samples(eval_samples)], 16)
  with open(tmp_path / "run" / "eval" / "results_step_00000004.json") as f:
    got_fid = json.load(f)["fid"]
  assert got_fid["num_samples"] == 16
  np.testing.assert_allclose(got_fid["value"], fid.frechet_distance(*fid.stats_from_features(features["pool_3"]),
                                                                    ref_mu, np.eye(fid.FEATURE_DIM)), rtol=1e-5)

  # Training continued on 2 processes from the 1-process checkpoint, like 1 process would.
  single = train.train_and_evaluate(tiny_config(num_train_steps=6), str(tmp_path / "copy"))
  assert max_rel_diff(_params(tmp_path / "run", 0), jax.tree.leaves(single.params)) <= 1e-6


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
