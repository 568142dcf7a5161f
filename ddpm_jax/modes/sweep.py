"""--mode=sweep: FID against the number of sampling steps, for each sampler (the quality-versus-steps figure).

The EMA params are loaded once; each (method, steps) pair of eval.sweep_methods × eval.sweep_steps is then --mode=eval
on them with bits/dim and figures off, so the sweep shares eval's sample directories, cached reference statistics
and resumption: a rerun skips whatever is on disk, and (ancestral, T steps) is --mode=eval's own run of the paper's
chain. Every pair decodes the same x_T per sample index, so the rows of the sample sheet differ only by the sampler.
Process 0 writes, in workdir/eval/: sweep_step_N.json and .csv (a row per pair) and sweep_step_N.png (FID against
steps, and the first samples of every pair).
"""
import copy
import json
import os

from absl import logging
import jax
import numpy as np

from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import sampling
from ddpm_jax import solvers
from ddpm_jax import trained_params
from ddpm_jax.evaluation import figures
from ddpm_jax.evaluation import inception_weights
from ddpm_jax.evaluation import samples
from ddpm_jax.modes import evaluate

NUM_SHOWN = 8  # Samples per pair on the sheet.


def pairs(config):
  """[(method, steps)] of the sweep, checked up front so that a typo fails before hours of sampling."""
  ev = config.eval
  T = config.diffusion.num_timesteps
  methods, steps = tuple(ev.sweep_methods), tuple(ev.sweep_steps)
  if not methods or not steps:
    raise ValueError("eval.sweep_methods and eval.sweep_steps must each name at least one value.")
  if ev.num_samples <= 0:
    raise ValueError("eval.num_samples must be > 0 for a sweep (FID needs samples).")
  for method in methods:
    if method not in sampling.METHODS:
      raise ValueError(f"eval.sweep_methods has {method!r}; choose from {sampling.METHODS}.")
  for n in steps:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
      raise ValueError(f"eval.sweep_steps has {n!r}; each must be an integer from 1 to T = {T}.")
  return [(m, n) for m in methods for n in sorted(set(steps))]


def pair_config(config, method, steps):
  """config for one pair: FID only; all T ancestral steps is the paper's chain (num_steps 0, eval's directory)."""
  c = copy.deepcopy(config)
  c.sampling.method = method
  if method not in solvers.METHODS:
    c.sampling.spacing = "auto"  # a sweep's sampling.spacing is for its solvers; its chains respace evenly
  c.sampling.num_steps = 0 if (method == "ancestral" and steps == config.diffusion.num_timesteps) else steps
  c.eval.bpd_num_examples = 0
  c.eval.figures = False
  return c


def _label(method, eta):
  return f"DDIM, η = {eta:g}" if method == "ddim" else method


def run(config, workdir):
  """Runs every pair (on every process) and returns the rows [{method, steps, eta, fid, num_samples, samples}]."""
  todo = pairs(config)
  weights = config.eval.inception_weights or inception_weights.default_weights_path()
  model, params, step = trained_params.load(config, workdir)
  rows = []
  for k, (method, steps) in enumerate(todo):
    logging.info("Sweep %d/%d: %s with %d steps", k + 1, len(todo), method, steps)
    results = evaluate.evaluate_params(pair_config(config, method, steps), workdir, model, params, step, weights)
    rows.append(dict(method=method, steps=steps, eta=config.sampling.eta if method == "ddim" else None,
                     fid=results["fid"]["value"], num_samples=results["fid"]["num_samples"],
                     samples=results["fid"]["samples"], checkpoint_step=results["checkpoint_step"]))
    logging.info("Sweep %d/%d: %s with %d steps: FID %.3f", k + 1, len(todo), method, steps, rows[-1]["fid"])
  if jax.process_index() == 0:
    write(rows, os.path.join(workdir, "eval", f"sweep_step_{rows[0]['checkpoint_step']:08d}"))
  return rows


def write(rows, path_prefix):
  """<prefix>.json, <prefix>.csv and <prefix>.png (needs matplotlib: skipped with a warning without it)."""
  fileio.write_text(path_prefix + ".json", json.dumps(rows, indent=2))
  figures.write_csv(path_prefix + ".csv", ("method", "eta", "steps", "fid", "num_samples"),
                    [(r["method"], "" if r["eta"] is None else r["eta"], r["steps"], f"{r['fid']:.6g}",
                      r["num_samples"]) for r in rows])
  shown = [samples.load_samples(r["samples"])[:NUM_SHOWN] for r in rows]
  if figures.save_plot(path_prefix + ".png", lambda: plot(rows, shown)) is not None:
    logging.info("Quality against steps in %s.{png,csv,json}", path_prefix)


def plot(rows, shown):
  """uint8 [H, W, 3]: FID against steps per method (left) and shown[i], the first samples of rows[i] (right)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(13, max(4.0, 0.55 * len(rows) + 1.0)), dpi=100)
  ax = fig.add_subplot(1, 2, 1)
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    respaced = " (respaced)" if method == "ancestral" else ""
    ax.plot([r["steps"] for r in mine], [r["fid"] for r in mine], "o-", label=_label(method, mine[0]["eta"]) + respaced)
  ax.set_xscale("log")
  ax.set_xlabel("sampling steps (network evaluations per sample)")
  ax.set_ylabel(f"FID ({rows[0]['num_samples']} samples)")
  ax.set_title(f"EMA params of step {rows[0]['checkpoint_step']}")
  ax.grid(alpha=0.3, which="both")
  ax.legend()

  per_row = min(len(s) for s in shown)
  sheet = images.make_grid(np.concatenate([s[:per_row] for s in shown]), ncols=per_row)
  right = fig.add_subplot(1, 2, 2)
  right.imshow(sheet.squeeze(-1) if sheet.shape[-1] == 1 else sheet, cmap="gray", interpolation="nearest")
  row_height = sheet.shape[0] / len(rows)
  right.set_yticks([(i + 0.5) * row_height for i in range(len(rows))])
  right.set_yticklabels([f"{_label(r['method'], r['eta'])}, {r['steps']}" for r in rows])
  right.set_xticks([])
  right.set_title("the same x_T through each sampler")
  return figures.rendered(fig)
