"""Progressive distillation (Salimans & Ho 2022): the math of one round, for a discrete-time DDPM.

A student takes one deterministic (DDIM, η = 0) step where its teacher takes two. Round after round the student of
one round teaches the next, halving the number of steps. Here the steps of every round lie on one grid of the
diffusion's integer timesteps, so each student's timesteps are every other one of its teacher's:

    grid(T, n_0) = [−1, t_1, …, t_{n_0}],  t_k = round(k·T/n_0) − 1  (−1 stands for the data itself: α = 1, σ = 0),

diffusers' 'trailing' timesteps, and a student of n steps uses grid[::n_0 // n] (the 'trailing' timesteps of n). With α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t), a DDIM step from s to u given a
prediction x̂ of the data is z_u = α_u x̂ + σ_u (z_s − α_s x̂)/σ_s. The student's target at z_t is the x̃ whose single
DDIM step from t lands where the teacher's two steps t → t' → u land (z_u''):

    x̃ = (z_u'' − (σ_u/σ_t) z_t) / (α_u − (σ_u/σ_t) α_t),

and its loss is the squared error of its x̂ against x̃ weighted by max(α_t²/σ_t², 1) ('truncated SNR').

Parameterisations of a network output as x̂ (PARAMETERIZATIONS): 'eps' (the DDPM teacher: x̂ = (z − σ ε̂)/α),
'v' (x̂ = α z − σ v̂; stable at the high-noise steps where 'eps' divides by α ≈ 0), 'x' (x̂ itself).
"""
import copy
import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import respacing
from ddpm_jax import train_step

PARAMETERIZATIONS = ("eps", "v", "x")


def grid(num_timesteps, start_steps):
  """int32 [start_steps + 1]: −1 (the data), then the 'trailing' timesteps of start_steps steps (respacing.py):
  round(k·T/start_steps) − 1 for k = 1, …, start_steps. Every student's points are a subset (the same real numbers,
  rounded alike), and a student of n steps samples as DDIM with spacing 'trailing' over n steps."""
  if isinstance(start_steps, bool) or not isinstance(start_steps, (int, np.integer)) or not (
      1 <= start_steps <= num_timesteps):
    raise ValueError(f"distill.start_steps must be an int in [1, {num_timesteps}] (the diffusion's T), got "
                     f"{start_steps!r}.")
  return np.concatenate([[-1], respacing.chain_timesteps(num_timesteps, start_steps, "trailing")]).astype(np.int32)


def round_steps(start_steps, end_steps):
  """The students' step counts, one per round: start_steps / 2, / 4, …, end_steps."""
  ratio = start_steps // end_steps if end_steps >= 1 and start_steps % end_steps == 0 else 0
  if ratio < 2 or ratio & (ratio - 1):
    raise ValueError(f"distill.start_steps = {start_steps} must be distill.end_steps = {end_steps} times a power of "
                     "two (at least 2): e.g. start_steps 64 and end_steps 4.")
  return [start_steps >> k for k in range(1, ratio.bit_length())]


def _first_round(config, steps):
  return steps == config.distill.start_steps // 2


def round_train_steps(config, steps):
  """Train steps of the round whose student takes `steps` steps: distill.first_round_steps for the first round (the
  one that turns a trained ε- or x-network into a v-student, where an ε-teacher's students lose the most),
  distill.last_round_steps for the last (where a v-teacher's do), distill.steps_per_round for every other; 0 = like
  the others. A single round is the first."""
  d = config.distill
  if _first_round(config, steps) and d.first_round_steps:
    return d.first_round_steps
  if steps == d.end_steps and not _first_round(config, steps) and d.last_round_steps:
    return d.last_round_steps
  return d.steps_per_round


def student_parameterization(config, steps):
  """What the student of `steps` steps predicts (PARAMETERIZATIONS): distill.first_round_parameterization in the first
  round if set (an ε-student of an ε-teacher starts exactly at its teacher's function), else distill.parameterization.
  The next round's student starts from these params and is read as its own parameterization."""
  d = config.distill
  first = _first_round(config, steps) and d.first_round_parameterization
  return d.first_round_parameterization if first else d.parameterization


def round_config(config, steps):
  """The training config of the round whose student takes `steps` steps: its length, distill's learning rate, its
  schedule, EMA decay and the students' dropout; no sample grids or FID on the way (the paper's chain is not the
  student's sampler)."""
  c = copy.deepcopy(config)
  c.training.num_train_steps = round_train_steps(config, steps)
  c.optim.lr = config.distill.lr
  c.optim.lr_anneal_steps = c.training.num_train_steps if config.distill.lr_schedule == "linear" else 0
  # The student is sampled from its EMA, which starts at the teacher's params: training's decay, sized to its own
  # run, can leave most of the EMA at that start after a short round (0.9995 over 1,000 steps: 61%). distill.ema_decay
  # is sized to steps_per_round; a round of another length gets the decay that leaves the same share of the start.
  decay = config.distill.ema_decay ** (config.distill.steps_per_round / c.training.num_train_steps)
  with c.ignore_type():  # a decay or dropout of 0 may have been given as the integer 0
    c.optim.ema_decay = decay
    # The target is a deterministic function of fresh noise, so there is nothing to regularise; the authors'
    # students train without dropout.
    c.model.dropout = config.distill.dropout
  c.training.sample_every_steps = 0
  c.training.fid_every_steps = 0
  return c


# A student's parameterization as the diffusion's model_mean_type, for sampling it; and a trained model's
# model_mean_type as a parameterization of x̂, for reading it as the first teacher.
STUDENT_MEAN_TYPE = dict(v="v", x="xstart", eps="eps")
TEACHER_PARAMETERIZATION = {mean_type: p for p, mean_type in STUDENT_MEAN_TYPE.items()}
CHECKPOINT_PREFIX = "distill/"  # sampling.checkpoint = 'distill/<steps>': the student of that round


def student_run(config, workdir):
  """(config, workdir) that sample a student when config.sampling.checkpoint is 'distill/<steps>': the round's
  directory and latest checkpoint, its parameterization as diffusion.model_mean_type, and its own sampler (<steps>
  DDIM steps on the 'trailing' timesteps it was trained on). η stays config.sampling.eta: 0 (the default) is the
  deterministic path the student was trained on; η > 0 re-noises between its steps (docs/distillation.md). Any
  other config is returned as it is."""
  choice = config.sampling.checkpoint
  if not choice.startswith(CHECKPOINT_PREFIX):
    return config, workdir
  steps = int(choice[len(CHECKPOINT_PREFIX):])
  c = copy.deepcopy(config)
  c.sampling.checkpoint = "latest"
  c.diffusion.model_mean_type = STUDENT_MEAN_TYPE[student_parameterization(config, steps)]
  c.sampling.method, c.sampling.num_steps, c.sampling.spacing = "ddim", steps, "trailing"
  return c, round_dir(workdir, steps)


def round_dir(workdir, steps):
  """WORKDIR/distill/<steps>: the round that trains the student of `steps` steps (a workdir of its own)."""
  return os.path.join(workdir, "distill", str(steps))


def student_grid(full_grid, steps):
  """The [steps + 1] points of `full_grid` a student of `steps` steps uses: every (n_0 // steps)-th."""
  start_steps = len(full_grid) - 1
  if steps < 1 or start_steps % steps:
    raise ValueError(f"a student of {steps} steps does not divide the grid of {start_steps}: the numbers of steps "
                     "must halve from distill.start_steps (a power-of-two multiple of distill.end_steps).")
  return full_grid[::start_steps // steps]


def alpha_sigma(diffusion, t):
  """(α_t, σ_t) for timesteps t (any shape; −1 = the data: (1, 0))."""
  data = t < 0
  index = jnp.maximum(t, 0)
  alpha = jnp.where(data, 1.0, diffusion.sqrt_alphas_cumprod[index])
  sigma = jnp.where(data, 0.0, diffusion.sqrt_one_minus_alphas_cumprod[index])
  return alpha, sigma


def _rows(values, x):
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def to_x0(output, z, alpha, sigma, parameterization):
  """The network's x̂ for output at z (alpha, sigma [B])."""
  a, s = _rows(alpha, z), _rows(sigma, z)
  if parameterization == "eps":
    return (z - s * output) / a
  if parameterization == "v":
    return a * z - s * output
  if parameterization == "x":
    return output
  raise ValueError(f"Unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}.")


def network_x0(model, params, diffusion, as_x0, clip, **apply_kwargs):
  """x0(z, t): the network's output at (z, t) read as x̂ by as_x0(out, z, α_t, σ_t), clipped to [−1, 1] if clip."""
  def x0(z, t):
    x = as_x0(model.apply({"params": params}, z, t, **apply_kwargs), z, *alpha_sigma(diffusion, t))
    return jnp.clip(x, -1.0, 1.0) if clip else x
  return x0


def ddim_step(x0, z, alpha_from, sigma_from, alpha_to, sigma_to):
  """z_u = α_u x̂ + σ_u (z_s − α_s x̂)/σ_s: the deterministic DDIM step s → u (σ_s > 0; u may be the data)."""
  eps = (z - _rows(alpha_from, z) * x0) / _rows(sigma_from, z)
  return _rows(alpha_to, z) * x0 + _rows(sigma_to, z) * eps


def target(teacher_x0, diffusion, z, t, t_mid, t_next):
  """x̃ [B, …]: the x̂ whose one DDIM step t → t_next ends where the teacher's t → t_mid → t_next does.

  teacher_x0(z, t) is the teacher's x̂ (clipped or not, as it samples); t, t_mid, t_next [B] with t > t_mid > t_next.
  """
  a_t, s_t = alpha_sigma(diffusion, t)
  a_m, s_m = alpha_sigma(diffusion, t_mid)
  a_n, s_n = alpha_sigma(diffusion, t_next)
  z_mid = ddim_step(teacher_x0(z, t), z, a_t, s_t, a_m, s_m)
  z_next = ddim_step(teacher_x0(z_mid, t_mid), z_mid, a_m, s_m, a_n, s_n)
  ratio = s_n / s_t
  return (z_next - _rows(ratio, z) * z) / _rows(a_n - ratio * a_t, z)


def truncated_snr_weight(alpha, sigma):
  """max(α²/σ², 1): the x-space loss weight of Salimans & Ho ('truncated SNR')."""
  return jnp.maximum(jnp.square(alpha) / jnp.square(sigma), 1.0)


def losses(student_x0, teacher_x0, diffusion, x_start, noise, step_index, points, midpoints):
  """Per-example losses [B] of a round (points, midpoints: `round_points`): example b takes the student step from
  points[i] to points[i − 1], i = step_index[b] in 1..n, against the teacher's two steps through midpoints[i].

  student_x0(z, t) and teacher_x0(z, t) return x̂; x_start [B, …] in [−1, 1] and noise give z_t.
  """
  points, midpoints = jnp.asarray(points), jnp.asarray(midpoints)
  t, t_mid, t_next = points[step_index], midpoints[step_index], points[step_index - 1]
  a_t, s_t = alpha_sigma(diffusion, t)
  z = _rows(a_t, x_start) * x_start + _rows(s_t, x_start) * noise
  x_target = jax.lax.stop_gradient(target(teacher_x0, diffusion, z, t, t_mid, t_next))
  err = jnp.mean(jnp.square(student_x0(z, t) - x_target), axis=tuple(range(1, x_start.ndim)))
  return truncated_snr_weight(a_t, s_t) * err


def round_points(full_grid, steps):
  """(student points [steps + 1], teacher midpoints [steps + 1]) of a round distilling 2·steps into `steps`:
  midpoint i lies between student points i − 1 and i (entry 0 unused)."""
  teacher = student_grid(full_grid, 2 * steps)
  return student_grid(full_grid, steps), np.concatenate([[-1], teacher[1::2]]).astype(np.int32)


class RoundArgs(NamedTuple):
  """RoundLoss's objective_args: everything that changes from round to round, as arrays of one shape in every round
  of a distillation, so that its rounds share one compiled train step (a compile per round cost minutes on CPU)."""
  teacher_params: Any
  teacher_parameterization: Any  # int32 []: the teacher's index in PARAMETERIZATIONS
  points: Any  # int32 [len(full_grid)]: round_points' student points, then −1 padding that no example draws
  midpoints: Any  # int32 [len(full_grid)]: round_points' teacher midpoints, padded alike
  steps: Any  # int32 []: the student's number of steps (the points' unpadded length − 1)


def round_args(teacher_params, teacher_parameterization, full_grid, steps):
  """The RoundArgs of the round that distills 2·steps teacher steps on `full_grid` into `steps`."""
  def padded(a):
    return np.pad(a, (0, len(full_grid) - len(a)), constant_values=-1).astype(np.int32)
  points, midpoints = round_points(full_grid, steps)
  return RoundArgs(teacher_params, np.int32(PARAMETERIZATIONS.index(teacher_parameterization)), padded(points),
                   padded(midpoints), np.int32(steps))


@dataclasses.dataclass(frozen=True)
class RoundLoss:
  """train_step's objective for one round: objective_args is the round's RoundArgs (`round_args`).

  Each example draws its student step i ∈ 1..n and its noise from its own key (as the paper's loss draws t and ε),
  is noised to points[i] and is trained toward the teacher's two-step target with the truncated-SNR weight. The
  teacher runs in inference mode (no dropout); the student in training mode. Hashable, so that
  train_step.pmapped_train_steps caches one compiled step for all the rounds of a distillation: what differs between
  rounds (the teacher, its parameterization, the points) is an argument. A class-conditional model's student and
  teacher see the same labels, dropped to null as in training, so the student also learns the teacher's
  unconditional steps (guided sampling of the student needs them).
  """
  student: str = "v"  # the student's parameterization (PARAMETERIZATIONS)
  clip_teacher: bool = True  # clip the teacher's x̂ to [−1, 1], as the sampling chains do

  def __call__(self, model, params, batch, example_keys, dropout_rng, diffusion, objective_args):
    args = objective_args
    images, labels = train_step.split_batch(batch)
    labels = train_step.dropped_labels(model, labels, example_keys)
    step_index = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 1, args.steps + 1))(
        example_keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), images.shape[1:], images.dtype))(
        example_keys)

    def teacher_as_x0(out, z, alpha, sigma):  # the parameterization is an argument: one branch runs
      branches = [functools.partial(to_x0, parameterization=p) for p in PARAMETERIZATIONS]
      return jax.lax.switch(args.teacher_parameterization, branches, out, z, alpha, sigma)

    teacher = network_x0(model, args.teacher_params, diffusion, teacher_as_x0, self.clip_teacher, labels=labels,
                         train=False)
    student = network_x0(model, params, diffusion, functools.partial(to_x0, parameterization=self.student), False,
                         labels=labels, train=True, rngs={"dropout": dropout_rng})
    return jnp.mean(losses(student, teacher, diffusion, images, noise, step_index, args.points, args.midpoints))
