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

from ddpm_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position  # imports no JAX

xla_cpu.apply()  # the flag in every compile but those given XLA_DEFAULT_OPTIONS (main_py_options, main_py_key)

# name → (our U-Net fields, image side, channels). 'digits' is the offline demo's (configs/digits.py: grayscale 8×8,
# 1.1M parameters); 'digits16' the same U-Net on the 16×16 digits of docs/evaluation.md (image_size² × ch = 8,192:
# between the two models ddpm_jax/xla_cpu.py's bound was first measured on); 'tiny' is for smoke tests: every kind
# of block, 0.7M parameters.
MODELS = {
    "cifar10": (dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)), 32, 3),
    "digits": (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)), 8, 1),
    "digits16": (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)), 16, 1),
    "tiny": (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), 8, 3),
}


# XLA's own choice of the ops YNNPACK runs (xla_cpu.XLA_DEFAULT) as compiler options: one compile with them beside
# ours (xla_cpu.FLAG) times what the flag buys, in one process.
XLA_DEFAULT_OPTIONS = xla_cpu.compiler_options(xla_cpu.XLA_DEFAULT)


def parse_args_and_config_overrides(parser, argv=None):
  """(args, overrides): the parser's arguments, and the --config.<field>=<value> flags among argv for load_config,
  so that a benchmark reads a workdir with the settings main.py was given for it (e.g. a v-model's
  --config.diffusion.model_mean_type=v). Anything else the parser does not know is an error, as with parse_args."""
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (besides this script's flags, only "
                 "--config.<field>=<value> overrides of the config file)")
  return args, rest


def load_config(path, overrides=()):
  """The config file's get_config() with --config.<field>=<value> overrides, parsed by ml_collections exactly as
  main.py parses its flags (locked: a field the config lacks is an error)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = [sys.argv[0], f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=path, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def check_readable(parser, config, workdir):
  """A usage error of the script, in one line, if workdir's params were trained with settings that read them
  differently from config's (a v-model read as an ε-model would give noise): recorded_config.check_readable."""
  from ddpm_jax import recorded_config  # pylint: disable=g-import-not-at-top
  try:
    recorded_config.check_readable(config, workdir)
  except ValueError as e:
    parser.error(str(e))


def add_common_flags(parser):
  parser.add_argument("--model", choices=sorted(MODELS), default="cifar10")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="torch.set_num_threads; XLA:CPU sizes its own pool to the cores it sees")
  parser.add_argument("--quick", action="store_true", help="the smallest settings (tiny model), for smoke tests")


def machine_info(threads):
  """Lines stating what decides the numbers: cores, CPU, load, library versions, threads, XLA flags."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top  # versions without importing the libraries
  from ddpm_jax.models import conv3x3  # pylint: disable=g-import-not-at-top  # after xla_cpu.apply (it imports JAX)
  cpu = conv3x3.cpu_info("model name") or platform.machine()
  versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("jax", "jaxlib", "flax", "torch", "diffusers"))
  return [f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {cpu}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
          f"versions: {versions}, python {platform.python_version()}",
          f"threads: torch.set_num_threads({threads}); XLA:CPU sizes its own intra-op pool to the cores; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"]


def train_config(name):
  """The config whose train step (optimizer, dropout, diffusion) the scripts run for model `name`: the demo's own
  for the digits models, CIFAR-10's otherwise."""
  from configs import cifar10, digits  # pylint: disable=g-import-not-at-top
  return (digits if name.startswith("digits") else cifar10).get_config()


def random_batch(name, batch, seed=0):
  """[batch, side, side, channels] float32 images of model `name`, uniform in the data's range [-1, 1]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  _, size, channels = MODELS[name]
  return np.random.default_rng(seed).uniform(-1, 1, size=(batch, size, size, channels)).astype(np.float32)


def diffusers_unet(ch, ch_mult, num_res_blocks, attn_resolutions, size, channels=3, dropout=0.0, seed=0):
  """diffusers' UNet2DModel laid out as the paper's U-Net (attention on the levels at attn_resolutions)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ddpm_jax import pretrained  # pylint: disable=g-import-not-at-top  # no JAX: bench_memory's PyTorch child
  torch.manual_seed(seed)
  return diffusers.UNet2DModel(**pretrained.diffusers_unet_kwargs(ch, ch_mult, num_res_blocks, attn_resolutions,
                                                                  size, dropout, channels=channels))


def matched_models(name, dropout=0.0, **unet_kwargs):
  """(our UNet, its params, diffusers' UNet2DModel, image side): one random init, copied into ours."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import pretrained  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
  fields, size, channels = MODELS[name]
  ours = unet.UNet(out_ch=channels, dropout=dropout, **fields, **unet_kwargs)
  theirs = diffusers_unet(**fields, size=size, channels=channels, dropout=dropout)
  abstract = jax.eval_shape(ours.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)),
                            jnp.zeros((1,), jnp.int32))
  state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
  params = pretrained.params_from_diffusers(state, abstract["params"], len(fields["ch_mult"]))
  return ours, params, theirs, size


def main_py_key(name, timed):
  """'ours' (compiled with xla_cpu.FLAG) or 'ours_xla' (with XLA_DEFAULT_OPTIONS, if timed has it): the one of the
  two compiles that is this model as main.py compiles it (the flag for small models only, xla_cpu.pays_for)."""
  return "ours_xla" if "ours_xla" in timed and main_py_options(name) is not None else "ours"


def main_py_options(name):
  """The compiler options that make a compile of model `name` the one main.py makes: on a CPU, XLA_DEFAULT_OPTIONS
  for the models xla_cpu.apply leaves the flag off for (CIFAR-10's size and up); None otherwise (the flag, which
  this module set for every compile, is main.py's too; other backends ignore it)."""
  import jax  # pylint: disable=g-import-not-at-top
  fields, size, _ = MODELS[name]
  return XLA_DEFAULT_OPTIONS if jax.default_backend() == "cpu" and not xla_cpu.pays_for(size, fields["ch"]) else None


def flops_of(compiled):
  """Total FLOPs of a compiled computation from XLA's cost analysis (a dict, or a list of one per module)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return sum(c.get("flops", 0.0) for c in cost)
  return cost.get("flops", 0.0)


def ours_train_step(model, params, config, batch_np, compiler_options=None):
  """(step fn, compile s, first-step s, FLOPs): training's own compiled pmapped step, on one device, state donated,
  compiled with XLA's compiler_options (e.g. XLA_DEFAULT_OPTIONS) if given.

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
  compiled = train_step.compiled_train_steps(p_step, holder[0], batches, slots, diffusion, rng,  # as training does
                                             compiler_options=compiler_options)
  compile_s = time.perf_counter() - t0

  def step():
    holder[0], metrics = compiled(holder[0], batches, slots, diffusion, rng)
    jax.block_until_ready((holder[0], metrics))
  step.compiled = compiled
  t0 = time.perf_counter()
  step()
  return step, compile_s, time.perf_counter() - t0, flops_of(compiled)


def ours_forward(model, params, batch_np, t=500, compiler_options=None):
  """One forward of ours at noise level t, as a sampling step calls it (train=False), AOT-compiled.

  The returned fn's .compiled is the executable (its HLO for profile_train's classes). batch_np [b, H, W, C].
  compiler_options: XLA options for this compile, e.g. XLA_DEFAULT_OPTIONS.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x, t = jnp.asarray(batch_np), jnp.full((batch_np.shape[0],), t, jnp.int32)
  compiled = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t).compile(
      compiler_options=compiler_options)

  def forward():
    compiled(params, x, t).block_until_ready()
  forward.compiled = compiled
  return forward


def ours_chain(model, params, diffusion, shape, sampler, compiler_options=None):
  """(chain fn, compile s): `sampler`'s (ddpm_jax.sampler.Sampler) whole chain, sampling.sample_loop as one
  AOT-compiled call (with XLA's compiler_options, e.g. XLA_DEFAULT_OPTIONS); the fn runs it and waits."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  chain = jax.jit(lambda p, rng: sampling.sample_loop(sampling.unet_model_fn(model, p), diffusion, rng, shape,
                                                      **sampler.chain_kwargs()))
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = chain.lower(params, rng).compile(compiler_options=compiler_options)
  return lambda: compiled(params, rng).block_until_ready(), time.perf_counter() - t0


def ddpm_scheduler(num_timesteps=1000):
  """diffusers' DDPMScheduler with the paper's settings: linear β from 1e-4 to 0.02 over num_timesteps, fixed-large
  variance, clipped x̂0."""
  import diffusers  # pylint: disable=g-import-not-at-top
  return diffusers.DDPMScheduler(num_train_timesteps=num_timesteps, beta_start=1e-4, beta_end=0.02,
                                 beta_schedule="linear", variance_type="fixed_large", clip_sample=True)


def diffusers_chain(model_pt, scheduler, steps, batch, device="cpu"):
  """(chain fn, first-call s): DDPMPipeline's loop (UNet, then scheduler.step) with `scheduler`, `steps` calls, on
  `device`; the first call, the timed warm-up, runs min(2, steps) of them."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  pipe = diffusers.DDPMPipeline(unet=model_pt.to(device).eval(), scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  gen = torch.Generator(device).manual_seed(0)
  t0 = time.perf_counter()
  pipe(batch_size=batch, num_inference_steps=min(2, steps), generator=gen, output_type="np")
  first_s = time.perf_counter() - t0
  # output_type="np" copies the images to the host, so the call waits for the device.
  return lambda: pipe(batch_size=batch, num_inference_steps=steps, generator=gen, output_type="np"), first_s


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


def torch_train_step(model_pt, config, batch_np, device="cpu", autocast_dtype=None):
  """(step fn, first-step s): draw t and ε, q_sample, forward, MSE, backward, clip, torch Adam, EMA.

  The usual PyTorch loop, with the same settings as config (constant lr: the warmup's cost is nil), on `device`
  (the model is moved there); autocast_dtype (e.g. torch.bfloat16) runs the forward and loss under torch.autocast,
  the usual mixed precision. Imports no JAX, so that bench_memory's PyTorch process holds PyTorch alone.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  d, o = config.diffusion, config.optim
  if d.beta_schedule != "linear":
    raise ValueError(f"only the linear schedule is set up here, got {d.beta_schedule!r}.")
  betas = np.linspace(d.beta_start, d.beta_end, d.num_timesteps, dtype=np.float64)
  alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32, device=device)
  model_pt.to(device).train()
  weights = list(model_pt.parameters())
  opt = torch.optim.Adam(weights, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
  ema = [w.detach().clone() for w in weights]
  x0 = torch.from_numpy(np.ascontiguousarray(batch_np.transpose(0, 3, 1, 2))).to(device)
  gen = torch.Generator(device).manual_seed(0)
  autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

  def step():
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen, device=device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    with autocast:
      loss = torch.nn.functional.mse_loss(model_pt(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(weights, o.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, weights, 1.0 - o.ema_decay)  # pylint: disable=protected-access
    return loss.item()  # waits for the device
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


def matmul_peak_fn(n=2048, calls=4, dtype="float32"):
  """(fn, flops): fn runs `calls` n×n matmuls of dtype (jitted, blocking) — a practical peak for this device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
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
