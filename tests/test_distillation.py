"""Progressive distillation's math against closed forms: the nested grids, the parameterisations, and the target
of one student step against two teacher DDIM steps computed independently in float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from configs import digits_long
from ddpm_jax import config_checks
from ddpm_jax import diffusion as dlib
from ddpm_jax import distillation
from ddpm_jax import respacing
from ddpm_jax import train_step

T = 1000
SHAPE = (3, 4, 4, 1)


def paper_diffusion():
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T))


def alphas_cumprod64():
  return np.cumprod(1.0 - dlib.get_beta_schedule("linear", num_timesteps=T).astype(np.float64))


def teacher_eps(z, t, xp=jnp):
  """A fixed smooth stand-in for an ε-network; t [B] (JAX) or a scalar (NumPy)."""
  scale = (t[:, None, None, None] if xp is jnp else t) / T
  return 0.8 * xp.tanh(z) + 0.2 * scale * xp.sin(3.0 * z)


def test_grids_are_nested_and_end_at_the_data_and_at_t_max():
  g = distillation.grid(T, 8)
  np.testing.assert_array_equal(g, [-1, 124, 249, 374, 499, 624, 749, 874, 999])
  for steps in (4, 2, 1):
    coarse, fine = distillation.student_grid(g, steps), distillation.student_grid(g, 2 * steps)
    assert set(coarse) <= set(fine) and coarse[0] == -1 and coarse[-1] == T - 1 and len(coarse) == steps + 1
  points, mid = distillation.round_points(g, 2)
  np.testing.assert_array_equal(points, [-1, 499, 999])
  np.testing.assert_array_equal(mid[1:], [249, 749])  # the teacher's points between the student's
  # The students' points are the 'trailing' respaced chains of their step counts (halves rounded alike).
  g16 = distillation.grid(T, 16)  # T/16 = 62.5: halves to round
  for steps in (16, 8, 4):
    np.testing.assert_array_equal(distillation.student_grid(g16, steps)[1:], respacing.chain_timesteps(T, steps,
                                                                                                       "trailing"))
  with pytest.raises(ValueError, match="does not divide the grid of 8"):
    distillation.student_grid(g, 3)
  with pytest.raises(ValueError, match="start_steps must be an int in"):
    distillation.grid(T, 0)


@pytest.mark.parametrize("parameterization", distillation.PARAMETERIZATIONS)
def test_each_parameterization_recovers_the_data_from_its_exact_output(parameterization):
  d = paper_diffusion()
  t = jnp.array([0, 400, 999])
  x = jax.random.uniform(jax.random.PRNGKey(0), SHAPE, minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  a, s = distillation.alpha_sigma(d, t)
  z = a[:, None, None, None] * x + s[:, None, None, None] * eps
  exact = dict(eps=eps, v=a[:, None, None, None] * eps - s[:, None, None, None] * x, x=x)[parameterization]
  np.testing.assert_allclose(distillation.to_x0(exact, z, a, s, parameterization), x, atol=2e-3 if
                             parameterization == "eps" else 1e-5)  # 'eps' divides by α_999 ≈ 0.006


@pytest.mark.parametrize("t, t_mid, t_next", [(999, 749, 499), (499, 249, -1), (124, 61, -1)])
def test_the_target_is_two_teacher_ddim_steps_in_one(t, t_mid, t_next):
  d = paper_diffusion()
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(2), SHAPE), np.float64)
  # Two DDIM steps of the teacher, in float64 NumPy from ᾱ.
  ac = alphas_cumprod64()
  a_s = lambda u: (1.0, 0.0) if u < 0 else (np.sqrt(ac[u]), np.sqrt(1.0 - ac[u]))
  def numpy_ddim(z, s, u):
    (a, sig), (a_u, sig_u) = a_s(s), a_s(u)
    eps = teacher_eps(z, s, xp=np)
    x0 = (z - sig * eps) / a
    return a_u * x0 + sig_u * eps
  z_next = numpy_ddim(numpy_ddim(z, t, t_mid), t_mid, t_next)

  teacher_x0 = lambda zz, tt: distillation.to_x0(teacher_eps(zz, tt), zz, *distillation.alpha_sigma(d, tt), "eps")
  full = lambda u: jnp.full((SHAPE[0],), u, jnp.int32)
  x_target = np.asarray(distillation.target(teacher_x0, d, jnp.asarray(z, jnp.float32), full(t), full(t_mid),
                                            full(t_next)), np.float64)
  # One DDIM step t → t_next from the target lands on the teacher's two-step result.
  (a_t, s_t), (a_n, s_n) = a_s(t), a_s(t_next)
  one_step = a_n * x_target + s_n * (z - a_t * x_target) / s_t
  np.testing.assert_allclose(one_step, z_next, rtol=2e-4, atol=2e-4 * np.abs(z_next).max())


def test_a_perfect_teacher_of_one_point_gives_that_point_and_zero_loss():
  d = paper_diffusion()
  point = jnp.linspace(-0.9, 0.9, 16).reshape(4, 4, 1)
  def exact_x0(z, t):  # the data is one point: E[x | z_t] is that point for every z_t
    return jnp.broadcast_to(point, z.shape)
  points, mid = distillation.round_points(distillation.grid(T, 8), 4)
  x = jnp.broadcast_to(point, SHAPE)
  noise = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
  step = jnp.array([1, 2, 4])
  t = jnp.asarray(points)[step]
  z = (distillation.alpha_sigma(d, t)[0][:, None, None, None] * x
       + distillation.alpha_sigma(d, t)[1][:, None, None, None] * noise)
  x_target = distillation.target(exact_x0, d, z, t, jnp.asarray(mid)[step], jnp.asarray(points)[step - 1])
  np.testing.assert_allclose(x_target, x, atol=1e-4)
  assert float(jnp.max(distillation.losses(exact_x0, exact_x0, d, x, noise, step, points, mid))) < 1e-7
  # A student off by δ everywhere pays max(SNR, 1)·δ².
  off = lambda z, t: exact_x0(z, t) + 0.1
  got = distillation.losses(off, exact_x0, d, x, noise, step, points, mid)
  a, s = distillation.alpha_sigma(d, t)
  np.testing.assert_allclose(got, 0.01 * np.maximum(a**2 / s**2, 1.0), rtol=1e-3)
  assert float(got[0]) > 0.01 and float(got[-1]) == pytest.approx(0.01, rel=1e-3)  # SNR ≈ 1.1 at t = 249, ≈ 0 at 999


def test_the_first_round_may_be_longer_and_keeps_the_same_share_of_its_teacher_in_the_ema():
  config = digits.get_config()
  config.distill.first_round_steps = 4000
  config_checks.validate(config, "distill")
  first, second = distillation.round_config(config, 32), distillation.round_config(config, 16)
  assert first.training.num_train_steps == 4000 and second.training.num_train_steps == 1000
  # The EMA keeps decay**steps of the teacher it started from: 0.995**1000 in both rounds.
  assert first.optim.ema_decay ** 4000 == pytest.approx(0.995 ** 1000, rel=1e-9)
  assert second.optim.ema_decay == 0.995
  assert first.optim.lr == second.optim.lr == 2e-4
  config.distill.first_round_steps = 0  # 0: like every other round
  assert distillation.round_config(config, 32).training.num_train_steps == 1000


def test_the_last_round_may_be_longer_and_a_single_round_is_the_first():
  config = digits.get_config()  # rounds of 32, 16, 8, 4 and 2 steps
  config.distill.first_round_steps, config.distill.last_round_steps = 3000, 4000
  config_checks.validate(config, "distill")
  lengths = {n: distillation.round_config(config, n).training.num_train_steps for n in (32, 16, 8, 4, 2)}
  assert lengths == {32: 3000, 16: 1000, 8: 1000, 4: 1000, 2: 4000}
  last = distillation.round_config(config, 2)
  assert last.optim.ema_decay ** 4000 == pytest.approx(0.995 ** 1000, rel=1e-9)
  assert last.optim.lr_anneal_steps == 4000
  config.distill.start_steps = 4  # one round, 4 → 2: the first round's length wins
  assert distillation.round_config(config, 2).training.num_train_steps == 3000
  config.distill.first_round_steps = 0
  assert distillation.round_config(config, 2).training.num_train_steps == 1000


def test_each_round_anneals_its_lr_to_zero_and_trains_its_student_without_dropout():
  config = digits_long.get_config()  # a teacher trained with dropout 0.1
  config.distill.first_round_steps = 4000
  first, later = distillation.round_config(config, 32), distillation.round_config(config, 16)
  for c, length in ((first, 4000), (later, 1000)):
    assert c.training.num_train_steps == c.optim.lr_anneal_steps == length and c.model.dropout == 0.0
    _, schedule = train_step.create_optimizer(c.optim)
    warmup = c.optim.warmup_steps
    np.testing.assert_allclose([schedule(warmup), schedule((warmup + length) / 2), schedule(length)],
                               [2e-4, 1e-4, 0.0], rtol=1e-6, atol=1e-12)
  config.distill.lr_schedule, config.distill.dropout = "constant", 0.1  # the settings before these fields existed
  c = distillation.round_config(config, 16)
  assert c.optim.lr_anneal_steps == 0 and c.model.dropout == 0.1
  assert float(train_step.create_optimizer(c.optim)[1](1000)) == pytest.approx(2e-4, rel=1e-6)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_student_samples_its_own_ddim_grid_with_the_eta_asked_for(eta):
  config = digits.get_config()
  config.sampling.method, config.sampling.num_steps, config.sampling.spacing = "ancestral", 0, "auto"
  config.sampling.eta = eta
  config.sampling.checkpoint = "distill/4"
  student, workdir = distillation.student_run(config, "runs/x")
  assert workdir == "runs/x/distill/4" and student.sampling.checkpoint == "latest"
  s = student.sampling
  assert (s.method, s.num_steps, s.spacing, s.eta) == ("ddim", 4, "trailing", eta)
  assert student.diffusion.model_mean_type == "v"
  assert config.sampling.method == "ancestral"  # the caller's config is left as it was


def test_an_eps_first_round_hands_its_eps_student_as_teacher_to_v_rounds(monkeypatch):
  """distill.first_round_parameterization='eps': round 1's student predicts ε (it starts exactly at the ε-teacher),
  later students v; each round's teacher is read in its own student's form, and each student is sampled in its own."""
  from ddpm_jax import trained_params  # pylint: disable=g-import-not-at-top
  from ddpm_jax.modes import distill  # pylint: disable=g-import-not-at-top
  from ddpm_jax.modes import train  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.distill.start_steps, config.distill.end_steps = 16, 2  # rounds of 8, 4 and 2 steps
  config.distill.first_round_parameterization = "eps"
  config_checks.validate(config, "distill")
  assert [distillation.student_parameterization(config, s) for s in (8, 4, 2)] == ["eps", "v", "v"]
  for steps, mean_type in ((8, "eps"), (4, "v"), (2, "v")):
    config.sampling.checkpoint = f"distill/{steps}"
    assert distillation.student_run(config, "w")[0].diffusion.model_mean_type == mean_type

  # The rounds as --mode=distill runs them, each round's training replaced by a record of what it was given.
  rounds = []
  def fake_round(round_config, workdir, init_params, objective, objective_args):
    rounds.append((objective.student, distillation.PARAMETERIZATIONS[int(objective_args.teacher_parameterization)],
                   float(init_params["w"])))
    return train_step.TrainState(step=round_config.training.num_train_steps, params=None, opt_state=None,
                                 ema_params={"w": np.float32(len(rounds))})
  monkeypatch.setattr(trained_params, "load", lambda config, workdir: (None, {"w": np.float32(0)}, 5))
  monkeypatch.setattr(train, "train_and_evaluate", fake_round)
  assert sorted(distill.run(config, "w")) == [2, 4, 8]
  # (student, teacher, the params it starts from): the trained ε-model, then each round's student's EMA params.
  assert rounds == [("eps", "eps", 0.0), ("v", "eps", 1.0), ("v", "v", 2.0)]
  config.distill.first_round_parameterization = ""  # '' = distill.parameterization in every round
  assert [distillation.student_parameterization(config, s) for s in (8, 4, 2)] == ["v", "v", "v"]
