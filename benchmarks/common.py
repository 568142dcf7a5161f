"""Helpers shared by the benchmark scripts: the same U-Net in both frameworks, alternating timing, tables.

Every figure the scripts report is a ratio of runs measured side by side, in alternating order, in one process:
the machines are shared, so absolute seconds drift with the load while ratios hold.
"""
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# name → (our U-Net fields, image side). 'tiny' is for smoke tests: every kind of block, 0.7M parameters.
MODELS = {
    "cifar10": (dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)), 32),
    "tiny": (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), 8),
}


def add_common_flags(parser):
  parser.add_argument("--model", choices=sorted(MODELS), default="cifar10")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="torch.set_num_threads; XLA:CPU sizes its own pool to the cores it sees")
  parser.add_argument("--quick", action="store_true", help="the smallest settings (tiny model), for smoke tests")


def machine_info(threads):
  """Lines stating what decides the numbers: cores, CPU, load, library versions, threads, XLA flags."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top  # versions without importing the libraries
  cpu = platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("jax", "jaxlib", "flax", "torch", "diffusers"))
  return [f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {cpu}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
          f"versions: {versions}, python {platform.python_version()}",
          f"threads: torch.set_num_threads({threads}); XLA:CPU sizes its own intra-op pool to the cores; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"]


def diffusers_unet(ch, ch_mult, num_res_blocks, attn_resolutions, size, dropout=0.0, seed=0):
  """diffusers' UNet2DModel laid out as the paper's U-Net (attention on the levels at attn_resolutions)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ddpm_jax import pretrained  # pylint: disable=g-import-not-at-top  # no JAX: bench_memory's PyTorch child
  torch.manual_seed(seed)
  return diffusers.UNet2DModel(**pretrained.diffusers_unet_kwargs(ch, ch_mult, num_res_blocks, attn_resolutions,
                                                                  size, dropout))


def matched_models(name, dropout=0.0, **unet_kwargs):
  """(our UNet, its params, diffusers' UNet2DModel, image side): one random init, copied into ours."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import pretrained  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
  fields, size = MODELS[name]
  ours = unet.UNet(out_ch=3, dropout=dropout, **fields, **unet_kwargs)
  theirs = diffusers_unet(**fields, size=size, dropout=dropout)
  abstract = jax.eval_shape(ours.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32))
  state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
  params = pretrained.params_from_diffusers(state, abstract["params"], len(fields["ch_mult"]))
  return ours, params, theirs, size


def flops_of(compiled):
  """Total FLOPs of a compiled computation from XLA's cost analysis (a dict, or a list of one per module)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return sum(c.get("flops", 0.0) for c in cost)
  return cost.get("flops", 0.0)


def ours_train_step(model, params, config, batch_np):
  """(step fn, compile s, first-step s, FLOPs): training's own compiled pmapped step, on one device, state donated.

  step.compiled is the compiled executable (its HLO for profile_train's classes).

  batch_np [b, H, W, C]; config supplies the optimizer (clip, Adam, warmup, EMA) and the diffusion.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train_step  # pylint: disable=g-import-not-at-top
  tx, _ = train_step.create_optimizer(config.optim)
  p_step = train_step.pmapped_train_steps(model, tuple(sorted(config.optim.items())))
  state = train_step.TrainState(step=np.zeros((), np.int32), params=params, ema_params=params, opt_state=tx.init(params))
  holder = [flax.jax_utils.replicate(state, devices=jax.local_devices()[:1])]
  del state
  batches = batch_np[None, None]  # [devices = 1, k = 1, b, H, W, C]
  slots = np.arange(batch_np.shape[0])[None]
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = train_step.compiled_train_steps(p_step, holder[0], batches, slots, diffusion, rng)  # as training does
  compile_s = time.perf_counter() - t0

  def step():
    holder[0], metrics = compiled(holder[0], batches, slots, diffusion, rng)
    jax.block_until_ready((holder[0], metrics))
  step.compiled = compiled
  t0 = time.perf_counter()
  step()
  return step, compile_s, time.perf_counter() - t0, flops_of(compiled)


def ours_forward(model, params, batch_np, t=500):
  """One forward of ours at noise level t, as a sampling step calls it (train=False), AOT-compiled.

  The returned fn's .compiled is the executable (its HLO for profile_train's classes). batch_np [b, H, W, C].
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x, t = jnp.asarray(batch_np), jnp.full((batch_np.shape[0],), t, jnp.int32)
  compiled = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t).compile()

  def forward():
    compiled(params, x, t).block_until_ready()
  forward.compiled = compiled
  return forward


def torch_forward(model_pt, batch_np, t=500):
  """One forward of the diffusers U-Net at noise level t, in eval mode and without autograd. batch_np [b, H, W, C]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(np.ascontiguousarray(batch_np.transpose(0, 3, 1, 2)))
  t = torch.full((batch_np.shape[0],), t)
  model_pt.eval()

  def forward():
    with torch.no_grad():
      model_pt(x, t)
  return forward


def torch_train_step(model_pt, config, batch_np):
  """(step fn, first-step s): draw t and ε, q_sample, forward, MSE, backward, clip, torch Adam, EMA.

  The usual PyTorch loop, with the same settings as config (constant lr: the warmup's cost is nil). Imports no JAX,
  so that bench_memory's PyTorch process holds PyTorch alone.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  d, o = config.diffusion, config.optim
  if d.beta_schedule != "linear":
    raise ValueError(f"only the linear schedule is set up here, got {d.beta_schedule!r}.")
  betas = np.linspace(d.beta_start, d.beta_end, d.num_timesteps, dtype=np.float64)
  alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
  model_pt.train()
  weights = list(model_pt.parameters())
  opt = torch.optim.Adam(weights, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
  ema = [w.detach().clone() for w in weights]
  x0 = torch.from_numpy(np.ascontiguousarray(batch_np.transpose(0, 3, 1, 2)))
  gen = torch.Generator().manual_seed(0)

  def step():
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    loss = torch.nn.functional.mse_loss(model_pt(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(weights, o.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, weights, 1.0 - o.ema_decay)  # pylint: disable=protected-access
    return loss.item()
  t0 = time.perf_counter()
  step()
  return step, time.perf_counter() - t0


def alternate(fns, repeats):
  """Runs each fn once per round, the order reversed every other round; name → list of seconds."""
  times = {name: [] for name in fns}
  order = list(fns)
  for r in range(repeats):
    for name in order if r % 2 == 0 else order[::-1]:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return times


def median(xs):
  return statistics.median(xs)


def spread(xs):
  """'min–max' of the samples, to show how noisy the machine was."""
  return f"{min(xs):.3f}–{max(xs):.3f}"


def matmul_peak_fn(n=2048, calls=4):
  """(fn, flops): fn runs `calls` float32 n×n matmuls (jitted, blocking) — a practical peak for this CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()

  def fn():
    for _ in range(calls):
      dot(a, b).block_until_ready()
  return fn, 2.0 * n**3 * calls


def print_table(header, rows):
  """A Markdown table (pastes into docs/performance.md as is)."""
  cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  print(line(cells[0]))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells[1:]:
    print(line(r))
