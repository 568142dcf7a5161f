"""Fast samplers on a trained model: our compiled solvers against diffusers' schedulers on the same weights.

  python benchmarks/bench_fast_samplers.py --config=configs/digits.py --workdir=runs/digits [--config.<field>=<value>]
  python benchmarks/bench_fast_samplers.py --tiny   # a 2-step model trained here: the logic only, in seconds

The EMA params of the workdir are loaded once and exported to a diffusers UNet2DModel (pretrained.params_to_diffusers,
load_state_dict strict), so both sides run one function. For each budget of network passes per sample, every sampler
decodes the same x_T per sample index (our per-example keys, sampling.py), and every sample set is scored with our
Inception FID against the cached statistics of the data (--mode=eval's reference). Seconds per sample: ours is the
compiled scan's run (its compile is timed apart); theirs is diffusers' plain loop of UNet calls and scheduler.step,
as DDPMPipeline runs it. The machine is shared: seconds drift with the load, FIDs do not.

Each set's FID and time are cached in WORKDIR/eval/bench_fast_samplers_step_N.json, so a rerun (e.g. with a wider
--budgets) measures only what is new; the 1000-step ancestral reference FID is cached there too (or --reference_fid).
"""
import argparse
import functools
import inspect
import json
import os
import sys
import tempfile
import time

import common  # pylint: disable=unused-import  # puts the repository on sys.path

import jax
import numpy as np

from ddpm_jax import analytic_dpm
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import fileio
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import pretrained
from ddpm_jax import sampling
from ddpm_jax import trained_params
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import figures
from ddpm_jax.evaluation import inception_weights
from ddpm_jax.modes import evaluate
from ddpm_jax.sampler import Sampler

# name → (label, Sampler fields). clip_denoised=False matches diffusers' solvers; '+clip' is the paper's chain.
OURS = {
    "ancestral": ("ancestral (paper) respaced", dict(method="ancestral")),
    "analytic": ("Analytic-DPM", dict(method="analytic_dpm")),
    "ddim": ("DDIM η=0", dict(method="ddim", eta=0.0, clip_denoised=False)),
    "dpm2": ("DPM-Solver++ 2M", dict(method="dpm_solver++", order=2, clip_denoised=False)),
    "dpm2_clip": ("DPM-Solver++ 2M +clip", dict(method="dpm_solver++", order=2, clip_denoised=True)),
    "dpm2_linspace": ("DPM-Solver++ 2M linspace", dict(method="dpm_solver++", order=2, clip_denoised=False,
                                                       spacing="linspace")),
    "dpm3": ("DPM-Solver++ 3M", dict(method="dpm_solver++", order=3, clip_denoised=False)),
    "sde2": ("SDE-DPM-Solver++ 2M", dict(method="sde_dpm_solver++", order=2, clip_denoised=False)),
    "sde2_linspace": ("SDE-DPM-Solver++ 2M linspace", dict(method="sde_dpm_solver++", order=2, clip_denoised=False,
                                                           spacing="linspace")),
    "unipc2": ("UniPC-2 bh2", dict(method="unipc", order=2, clip_denoised=False)),
    "unipc3": ("UniPC-3 bh2", dict(method="unipc", order=3, clip_denoised=False)),
}
# name → (label, diffusers class, its settings beyond the betas). Their defaults otherwise (DDPM: the ancestral chain
# with σ² = β̃ ('fixed_small'); DDPM and DDIM: 'leading' spacing and clip_sample=True; the others 'linspace' and no
# clipping).
THEIRS = {
    "ddpm": ("DDPMScheduler", "DDPMScheduler", {}),
    "ddim": ("DDIMScheduler η=0", "DDIMScheduler", {}),
    "dpm2m": ("DPMSolverMultistep 2M", "DPMSolverMultistepScheduler", dict(solver_order=2)),
    "dpm3m": ("DPMSolverMultistep 3M", "DPMSolverMultistepScheduler", dict(solver_order=3)),
    "sde_dpm2m": ("DPMSolverMultistep sde-2M", "DPMSolverMultistepScheduler",
                  dict(solver_order=2, algorithm_type="sde-dpmsolver++")),
    "unipc": ("UniPCMultistep bh2", "UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistep", "DEISMultistepScheduler", {}),
    "euler": ("EulerDiscrete", "EulerDiscreteScheduler", {}),
}
# Our diffusion.model_mean_type as diffusers' schedulers' prediction_type.
DIFFUSERS_PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "xstart": "sample"}
TINY_OURS, TINY_THEIRS = ("analytic", "dpm2"), ("ddpm", "dpm2m")
GOAL_RATIO = 1.5  # our best at 20 passes against the 1000-step ancestral FID


def tiny_run(tmp, fid_reference=True):
  """(config, workdir) of a tiny digits model trained here for 2 steps, T = 100; with fid_reference, FID against 16
  real digits (a stats file written here)."""
  from ddpm_jax.modes import train  # pylint: disable=g-import-not-at-top
  config = common.load_config(os.path.join(common.REPO, "configs", "digits.py"))
  config.diffusion.num_timesteps = 100
  config.data.image_size = 8
  config.model.ch_mult, config.model.attn_resolutions = (1, 2), (4,)
  config.training.batch_size, config.training.num_train_steps = 8, 2
  config.optim.warmup_steps = 2
  config.training.checkpoint_every_steps, config.training.sample_every_steps = 2, 0
  config.training.log_every_steps, config.training.fid_every_steps = 1, 0
  config.eval.inception_batch_size = 16
  config.sampling.analytic_num_examples = 64  # Analytic-DPM's E‖ε̂‖² on 64 digits, not 1,000: a smoke test
  workdir = os.path.join(tmp, "run")
  train.train_and_evaluate(config, workdir)
  if not fid_reference:
    return config, workdir
  # All 1,797 digits through Inception take minutes: the reference is 16 of them, written as a stats file.
  source = evaluate.eval_examples(config.data, "train")[0]
  feature_fn = evaluate.inception_features(inception_weights.default_weights_path())
  feats = fid.compute_features(feature_fn, [np.stack([source[i] for i in range(16)])], 16)["pool_3"]
  config.eval.ref_stats = os.path.join(tmp, "ref_stats.npz")
  fid.save_stats(config.eval.ref_stats, *fid.stats_from_features(feats))
  return config, workdir


def x_T(rng, num, shape, T):
  """[num, H, W, C] x_T of samples 0…num−1, keyed exactly as sampling.py keys them."""
  draw = lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), T), shape)
  return np.asarray(jax.jit(jax.vmap(draw))(np.arange(num)))


def ours_sampler(model, params, diffusion, rng, num, batch, shape, kwargs):
  """(uint8 samples, compile s, run s): one compiled scan for the sampler, run over the batches."""
  fn = jax.jit(lambda p, first: sampling.sample_loop(sampling.unet_model_fn(model, p), diffusion, rng,
                                                     (batch,) + shape, first_index=first, **kwargs))
  t0 = time.perf_counter()
  compiled = fn.lower(params, np.int32(0)).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = [compiled(params, np.int32(first)) for first in range(0, num, batch)]
  out = np.concatenate(jax.block_until_ready(out))[:num]
  return images.to_uint8(out), compile_s, time.perf_counter() - t0


def diffusers_sampler(unet_pt, scheduler, x_init, passes, batch, seed):
  """(uint8 samples, run s): DDPMPipeline's loop with `scheduler` from the given x_T, batch by batch."""
  import torch  # pylint: disable=g-import-not-at-top
  scheduler.set_timesteps(passes)
  if len(scheduler.timesteps) != passes:
    raise ValueError(f"{type(scheduler).__name__} takes {len(scheduler.timesteps)} passes for {passes} steps.")
  gen = torch.Generator().manual_seed(seed)  # the SDE's noise (theirs, not our keys)
  extra = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
  out = []
  t0 = time.perf_counter()
  with torch.no_grad():
    for first in range(0, len(x_init), batch):
      scheduler.set_timesteps(passes)  # multistep schedulers keep state between steps: a fresh start per batch
      x = torch.from_numpy(np.array(x_init[first:first + batch].transpose(0, 3, 1, 2)))  # a writable copy
      x = x * scheduler.init_noise_sigma
      for t in scheduler.timesteps:
        eps = unet_pt(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x, **extra).prev_sample
      out.append(x.numpy().transpose(0, 2, 3, 1))
  run_s = time.perf_counter() - t0
  return images.to_uint8(np.concatenate(out)), run_s


def diffusers_unet(config, params, batch):
  """diffusers' UNet2DModel holding our params (exported, loaded strictly), eval mode, warmed up."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  m = config.model
  kwargs = pretrained.diffusers_unet_kwargs(m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions),
                                            config.data.image_size, channels=config.data.channels)
  unet_pt = diffusers.UNet2DModel(**kwargs)
  state = pretrained.params_to_diffusers(jax.device_get(params), len(m.ch_mult))
  unet_pt.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  unet_pt.eval()
  with torch.no_grad():  # a warm-up pass at the timed batch size: the first calls of PyTorch allocate and pick kernels
    unet_pt(torch.zeros((batch, config.data.channels) + (config.data.image_size,) * 2), torch.tensor(500))
  return unet_pt


def make_scheduler(config, cls_name, settings):
  import diffusers  # pylint: disable=g-import-not-at-top
  d = config.diffusion
  if d.beta_schedule != "linear":
    raise ValueError(f"only the linear schedule is set up for diffusers here, got {d.beta_schedule!r}.")
  if d.model_mean_type not in DIFFUSERS_PREDICTION_TYPE:
    raise ValueError(f"diffusers' schedulers cannot read a {d.model_mean_type!r} model; run --theirs='' for ours only.")
  return getattr(diffusers, cls_name)(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
                                      beta_end=d.beta_end, beta_schedule="linear",
                                      prediction_type=DIFFUSERS_PREDICTION_TYPE[d.model_mean_type], **settings)


class Scorer:
  """FID of uint8 sample sets against the data's reference statistics, with our Inception."""

  def __init__(self, config, workdir):
    self.feature_fn = evaluate.inception_features(config.eval.inception_weights
                                                  or inception_weights.default_weights_path())
    self.batch_size = config.eval.inception_batch_size
    self.mu, self.sigma, self.description = evaluate.fid_reference(config, workdir, self.feature_fn)

  def __call__(self, samples_u8):
    feats = fid.compute_features(self.feature_fn, [samples_u8], self.batch_size)["pool_3"]
    return fid.fid_from_features(feats, self.mu, self.sigma)


class Cache:
  """Results by key in a JSON file (written after every set, so an interrupted run keeps what it measured)."""

  def __init__(self, path):
    self.path = path
    self.data = json.loads(fileio.read_text(path)) if fileio.exists(path) else {}

  def get(self, key):
    return self.data.get(key)

  def put(self, key, value):
    self.data[key] = value
    fileio.write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def fmt(x, digits=1):
  return "—" if x is None else f"{x:.{digits}f}"


def table(rows, budgets, time_at):
  """Markdown lines: a row per (side, sampler), FID per budget, then seconds per sample at time_at passes."""
  head = ["side", "sampler"] + [f"FID@{b}" for b in budgets] + [f"s/sample@{time_at}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["side"], r["label"]] + [fmt(r["fid"].get(b)) for b in budgets] + [fmt(r["s"].get(time_at), 5)]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def best(rows, side, budget):
  """(FID, label) of the best sampler of `side` at `budget`, or (None, None)."""
  scored = [(r["fid"][budget], r["label"]) for r in rows if r["side"] == side and budget in r["fid"]]
  return min(scored) if scored else (None, None)


def goal_lines(rows, budgets, time_at, reference_fid, T):
  verdict = lambda ok: "PASS" if ok else "MISS"
  lines = []
  for b in [b for b in budgets if b <= 20]:
    (ours, ours_l), (theirs, theirs_l) = best(rows, "ours", b), best(rows, "diffusers", b)
    if ours is not None and theirs is not None:
      lines.append(f"goal: at {b} passes our best FID {ours:.2f} ({ours_l}) ≤ diffusers' best {theirs:.2f} "
                   f"({theirs_l}): {verdict(ours <= theirs)}")
  ours, ours_l = best(rows, "ours", time_at)
  if ours is not None:
    lines.append(f"goal: at {time_at} passes our best FID {ours:.2f} ({ours_l}) ≤ {GOAL_RATIO} × the {T}-step "
                 f"ancestral FID {reference_fid:.2f} = {GOAL_RATIO * reference_fid:.2f}: "
                 f"{verdict(ours <= GOAL_RATIO * reference_fid)}")
  times = {side: [r["s"][time_at] for r in rows if r["side"] == side and time_at in r["s"]]
           for side in ("ours", "diffusers")}
  if times["ours"] and times["diffusers"]:
    mine, theirs = np.median(times["ours"]), np.median(times["diffusers"])
    lines.append(f"goal: at {time_at} passes our s/sample (median over samplers {mine:.5f}, range "
                 f"{min(times['ours']):.5f}–{max(times['ours']):.5f}) ≤ diffusers' ({theirs:.5f}, range "
                 f"{min(times['diffusers']):.5f}–{max(times['diffusers']):.5f}): {verdict(mine <= theirs)}")
  return lines


def plot(rows, budgets, reference_fid, T, title):
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(9, 5.5), dpi=100)
  ax = fig.add_subplot(1, 1, 1)
  for r in rows:
    xs = [b for b in budgets if b in r["fid"]]
    ax.plot(xs, [r["fid"][b] for b in xs], "o-" if r["side"] == "ours" else "s--", label=f"{r['side']}: {r['label']}")
  ax.axhline(reference_fid, color="k", lw=0.8, ls=":", label=f"ancestral, {T} passes ({reference_fid:.1f})")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xticks(budgets)
  ax.set_xticklabels([str(b) for b in budgets])
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # the budgets only, not log-axis labels such as 6×10⁰
  ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
  ax.set_xlabel("network passes per sample")
  ax.set_ylabel("FID")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, ncol=2)
  return figures.rendered(fig)


def reference(args, cache, config, model, params, diffusion, rng, shape, scorer):
  """The paper's chain (all T ancestral steps, clipped) FID: --reference_fid, the cache, or measured once."""
  if args.reference_fid is not None:
    return args.reference_fid
  key = f"reference/ancestral{diffusion.num_timesteps}/n{args.num_samples}"
  hit = cache.get(key)
  if hit is None and args.cached_only:
    raise ValueError(f"--cached_only: {cache.path} has no reference FID; pass --reference_fid.")
  if hit is None:
    print(f"measuring the {diffusion.num_timesteps}-step ancestral FID (once; cached in {cache.path})", flush=True)
    u8, compile_s, run_s = ours_sampler(model, params, diffusion, rng, args.num_samples, args.batch_size, shape,
                                        Sampler().chain_kwargs())
    hit = dict(fid=scorer(u8), compile_s=compile_s, s_per_sample=run_s / args.num_samples)
    cache.put(key, hit)
  return hit["fid"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(common.REPO, "configs", "digits.py"))
  parser.add_argument("--workdir", help="a trained run (its latest checkpoint's EMA params)")
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=256, help="samples per batch, both sides")
  parser.add_argument("--budgets", default="5,10,20,50,100", help="network passes per sample")
  parser.add_argument("--time_at", type=int, default=20, help="the budget of the seconds-per-sample column")
  parser.add_argument("--ours", default=",".join(OURS), help=f"of {','.join(OURS)}")
  parser.add_argument("--theirs", default=",".join(THEIRS), help=f"of {','.join(THEIRS)}")
  parser.add_argument("--reference_fid", type=float, help="the 1000-step ancestral FID, instead of measuring it")
  parser.add_argument("--out", default="bench_fast_samplers", help="prefix of the .csv and .png written")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
  parser.add_argument("--cached_only", action="store_true",
                      help="measure nothing: the table of what the cache holds (e.g. after an interrupted run)")
  parser.add_argument("--tiny", action="store_true", help="a 2-step model trained here, 16 samples, budgets 5, 10")
  args, overrides = common.parse_args_and_config_overrides(parser, argv)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  start = time.perf_counter()
  tmp = tempfile.TemporaryDirectory(prefix="bench_fast_samplers_") if args.tiny else None
  if args.tiny:
    config, workdir = tiny_run(tmp.name)
    args.num_samples, args.batch_size, args.time_at = 16, 16, 10
    args.budgets, args.ours, args.theirs = "5,10", ",".join(TINY_OURS), ",".join(TINY_THEIRS)
    args.out = os.path.join(tmp.name, "bench") if args.out == parser.get_default("out") else args.out
  else:
    if not args.workdir:
      parser.error("--workdir (a trained run) is required without --tiny")
    config, workdir = common.load_config(args.config, overrides), args.workdir
    common.check_readable(parser, config, workdir)
  budgets = sorted({int(b) for b in args.budgets.split(",")})
  ours_names, theirs_names = args.ours.split(",") if args.ours else [], args.theirs.split(",") if args.theirs else []
  for name in ours_names:
    if name not in OURS:
      parser.error(f"--ours has {name!r}; choose from {','.join(OURS)}")
  for name in theirs_names:
    if name not in THEIRS:
      parser.error(f"--theirs has {name!r}; choose from {','.join(THEIRS)}")

  for line in common.machine_info(args.threads):
    print(line)
  model, params, step = trained_params.load(config, workdir)
  params = jax.device_get(params)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  T = diffusion.num_timesteps
  shape = images.image_shape(config.data)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)  # --mode=sample/eval's key for this checkpoint
  x_init = x_T(rng, args.num_samples, shape, T)
  unet_pt = diffusers_unet(config, params, args.batch_size)
  scorer = Scorer(config, workdir)
  cache = Cache(os.path.join(workdir, "eval", f"bench_fast_samplers_step_{step:08d}.json"))
  print(f"EMA params of step {step} in {workdir}; {args.num_samples} samples in batches of {args.batch_size}; "
        f"FID against {scorer.description}")
  reference_fid = reference(args, cache, config, model, params, diffusion, rng, shape, scorer)

  rows = [dict(side=side, name=name, label=(OURS if side == "ours" else THEIRS)[name][0], fid={}, s={}, compile_s={})
          for side, names in (("ours", ours_names), ("diffusers", theirs_names)) for name in names]
  # Budget by budget, the time_at column first: an interrupted run has whole columns cached.
  for b in sorted(budgets, key=lambda b: (b != args.time_at, b)):
    for row in rows:
      side, name, label = row["side"], row["name"], row["label"]
      key = f"{side}/{name}/{b}/n{args.num_samples}/b{args.batch_size}"
      hit = cache.get(key)
      if hit is None and args.cached_only:
        continue  # a '—' cell
      if hit is None:
        t0 = time.perf_counter()
        if side == "ours":
          sampler = Sampler(num_steps=b, **OURS[name][1])
          if sampler.method == analytic_dpm.METHOD:  # E‖ε̂‖² on training examples, as --mode=sample does
            sampler = analytic_dpm.fit(sampler, sampling.unet_model_fn(model, params), diffusion,
                                       input_pipeline.make_source(config.data),
                                       num_examples=config.sampling.analytic_num_examples,
                                       batch_size=config.sampling.batch_size, seed=config.seed)
          kwargs = sampler.chain_kwargs()
          u8, compile_s, run_s = ours_sampler(model, params, diffusion, rng, args.num_samples, args.batch_size,
                                              shape, kwargs)
        else:
          scheduler = make_scheduler(config, THEIRS[name][1], THEIRS[name][2])
          u8, run_s = diffusers_sampler(unet_pt, scheduler, x_init, b, args.batch_size, config.seed)
          compile_s = None
        hit = dict(fid=scorer(u8), s_per_sample=run_s / args.num_samples, compile_s=compile_s)
        cache.put(key, hit)
        print(f"  {side} {label} @ {b}: FID {hit['fid']:.2f}, {hit['s_per_sample']:.5f} s/sample "
              f"({time.perf_counter() - t0:.0f} s with compile and FID)", flush=True)
      row["fid"][b], row["s"][b], row["compile_s"][b] = hit["fid"], hit["s_per_sample"], hit["compile_s"]

  print()
  print(f"FID ({args.num_samples} samples, our Inception) against network passes per sample; the same x_T per "
        f"sample index on both sides; {T}-step ancestral FID (ours, clipped): {reference_fid:.2f}")
  for line in table(rows, budgets, args.time_at):
    print(line)
  compiles = [c for r in rows for c in r["compile_s"].values() if c is not None]
  if compiles:
    print(f"our compile per sampler and budget (not in s/sample): {min(compiles):.1f}–{max(compiles):.1f} s")
  lines = goal_lines(rows, budgets, args.time_at, reference_fid, T)
  for line in lines:
    print(line)
  figures.write_csv(args.out + ".csv", ["side", "sampler", "name"] + [f"fid_{b}" for b in budgets]
                    + [f"s_per_sample_{b}" for b in budgets],
                    [[r["side"], r["label"], r["name"]] + [fmt(r["fid"].get(b), 4) for b in budgets]
                     + [fmt(r["s"].get(b), 6) for b in budgets] for r in rows]
                    + [["reference", f"ancestral {T}", "ancestral"] + [fmt(reference_fid, 4)] * len(budgets)
                       + [""] * len(budgets)])
  title = f"{config.data.name}, EMA params of step {step}, {args.num_samples} samples"
  figures.save_plot(args.out + ".png", functools.partial(plot, rows, budgets, reference_fid, T, title))
  print(f"wrote {args.out}.csv and {args.out}.png; {time.perf_counter() - start:.0f} s in all")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  sys.exit(main())
