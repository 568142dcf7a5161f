"""FID's reference side: the Inception pool_3 statistics (μ, Σ) of the data, computed once and cached.

The paper compares 50k samples with the CIFAR-10 training set. The statistics come either from a TTUR-format file
(eval.ref_stats) or from every example of config.data (no flips), cached next to the evaluation outputs with a key
naming the data they came from: a cache of other data, or of a file whose contents changed, is recomputed.
"""
import logging
import os

import numpy as np

from ddpm_jax import fileio
from ddpm_jax import input_pipeline
from ddpm_jax import progress
from ddpm_jax.evaluation import fid


def data_name(data):
  """A short file-name-safe name of config.data: the tfds name, the file or folder name, or the source."""
  if data.source == "tfds":
    return data.name.replace("/", "_")
  if data.source in ("npz", "folder"):
    return os.path.splitext(os.path.basename(os.path.normpath(data.path)))[0]
  return data.source


def _data_key(data, num_examples):
  """What the reference statistics were computed from; a cache with another key is recomputed."""
  key = [f"{k}={data.get(k)}" for k in ("source", "name", "split", "data_dir", "image_key", "image_size", "channels")]
  if data.source in ("npz", "folder"):
    st = os.stat(data.path)  # same path, new contents: a new key (a folder's mtime changes when files come or go)
    key.append(f"path={os.path.abspath(data.path)}|{st.st_size}|{st.st_mtime_ns}")
  return " ".join(key + [f"num_examples={num_examples}"])


def reference_stats(data, feature_fn, cache_dir, *, batch_size, stats_file=""):
  """(mu [2048], sigma [2048, 2048], description) to compute FID against.

  stats_file if set (TTUR's layout: mu, sigma); otherwise the pool_3 statistics of every example of `data` (a
  config.data), cached as cache_dir/ref_stats_<name>_<split>.npz (mu, sigma, and the data they came from).
  feature_fn(uint8 [B, H, W, C]) → {'pool_3': [B, 2048], …} (evaluation/inception.py).
  """
  if stats_file:
    mu, sigma = fid.load_stats(stats_file)
    return mu, sigma, f"file {stats_file}"
  source = input_pipeline.make_source(data)
  key = _data_key(data, len(source))
  split = data.split if data.source == "tfds" else "all"
  cache = os.path.join(cache_dir, f"ref_stats_{data_name(data)}_{split}.npz")
  description = f"{data.source} {data_name(data)} {split} ({len(source)} images), cached in {cache}"
  if fileio.exists(cache):
    cached = fileio.load_npz(cache)
    cached_key = str(cached["data"]) if "data" in cached else None
    if cached_key == key:
      logging.info("Reference statistics from the cache %s", cache)
      return cached["mu"], cached["sigma"], description
    logging.warning("%s was computed from other data (%s); recomputing for %s", cache, cached_key, key)
  report = progress.Progress("Inception features of the reference data", len(source), "images")

  def images():
    for i in range(len(source)):
      yield source[i]
      report.update(i + 1)  # fetched, so at most one Inception batch ahead of the features
  mu, sigma = fid.stats_from_features(fid.compute_features(feature_fn, images(), batch_size)["pool_3"])
  fileio.save_npz(cache, mu=mu, sigma=sigma, data=np.array(key))
  return mu, sigma, description
