"""--mode=distill: progressive distillation (Salimans & Ho 2022) of the run's EMA params, round after round.

Round n (n = distill.start_steps / 2, /4, …, distill.end_steps) trains a student of n steps toward its teacher's 2n
steps (distillation.py) in WORKDIR/distill/<n>/: a training run of its own (modes/train.py: pmap, EMA, Orbax
checkpoints, data position, preemption and bit-exact resume), whose student starts from the teacher's params. The
first teacher is the EMA model of config.sampling.checkpoint (or config.restore_from) taking DDIM steps; each later
one is the EMA student of the round before. A rerun skips finished rounds and resumes the unfinished one.
"""
import logging

import jax

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import distillation
from ddpm_jax import trained_params


def run(config, workdir):
  """Runs (or resumes) every round; returns {steps: the student's final TrainState}."""
  from ddpm_jax.modes import train  # pylint: disable=g-import-not-at-top  # TensorFlow: not for config_checks
  d = config.distill
  schedule = distillation.round_steps(d.start_steps, d.end_steps)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  if diffusion.learns_variance or diffusion.model_mean_type not in distillation.TEACHER_PARAMETERIZATION:
    raise ValueError(f"--mode=distill needs a model predicting ε or x_0 with a fixed variance, not "
                     f"{diffusion.model_mean_type!r} / {diffusion.model_var_type!r}.")
  full_grid = distillation.grid(diffusion.num_timesteps, d.start_steps)
  _, teacher, step = trained_params.load(config, workdir)
  logging.info("Distilling the EMA params of step %d: %d-step DDIM, then students of %s steps.", step,
               d.start_steps, ", ".join(map(str, schedule)))
  teacher_parameterization = distillation.TEACHER_PARAMETERIZATION[diffusion.model_mean_type]
  # Host copies: every round passes its teacher alike (uncommitted, as Orbax restores them), so that the rounds'
  # arguments match and one compiled step serves them all.
  teacher = jax.device_get(teacher)
  students = {}
  for steps in schedule:
    # The student's parameterization is static in the loss: a round whose student differs compiles its own step.
    student = distillation.student_parameterization(config, steps)
    objective = distillation.RoundLoss(student=student, clip_teacher=bool(config.sampling.clip_denoised))
    round_args = distillation.round_args(teacher, teacher_parameterization, full_grid, steps)
    logging.info("Round %d → %d steps in %s", 2 * steps, steps, distillation.round_dir(workdir, steps))
    state = train.train_and_evaluate(distillation.round_config(config, steps), distillation.round_dir(workdir, steps),
                                     init_params=teacher, objective=objective, objective_args=round_args)
    students[steps] = state
    # Stopped on request (SIGTERM): the rerun resumes this round.
    if int(state.step) < distillation.round_train_steps(config, steps):
      break
    teacher, teacher_parameterization = jax.device_get(state.ema_params), student
  return students
