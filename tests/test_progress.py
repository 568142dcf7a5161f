"""Progress reports: the reporter's rate limit and ETA, and reports from inside the compiled chain and bound."""
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal
from ddpm_jax import diffusion as dlib
from ddpm_jax.evaluation import bpd
from ddpm_jax import progress
from ddpm_jax import sampling
from ddpm_jax.models import unet

T = 50


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_rate_limit_eta_and_completion():
  clock = FakeClock()
  p = progress.Progress("Sampling", 100, "steps", interval=30, clock=clock)
  clock.now = 5.0
  # The first update logs, with no ETA yet: the time so far may be mostly start-up (compilation).
  assert p.update(10) == "Sampling: 10/100 steps (10.0%), 5s elapsed, ETA ?"
  clock.now = 34.9
  assert p.update(20) is None  # 29.9 s after the last line
  clock.now = 45.0
  # The rate since the first update (40 s for 40 steps) leaves the start-up (compilation) out of the ETA.
  assert p.update(50) == "Sampling: 50/100 steps (50.0%), 45s elapsed, ETA 50s"
  clock.now = 80.0
  assert p.update(50) is None  # not an increase (e.g. a repeat from another thread)
  assert p.update(40) is None
  clock.now = 81.0
  assert p.update(100) == "Sampling: 100/100 steps (100.0%), 1m21s elapsed, ETA 0s"  # completion: always logged
  assert p.update(120) is None


def test_lines_go_to_the_info_log(caplog):
  clock = FakeClock()
  p = progress.Progress("Reference", 3, "images", clock=clock)
  with caplog.at_level(logging.INFO):
    for i in range(1, 4):
      clock.now = i
      p.update(i)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Reference:")]
  assert lines == ["Reference: 1/3 images (33.3%), 1s elapsed, ETA ?", "Reference: 3/3 images (100.0%), 3s elapsed, "
                   "ETA 0s"]


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (185, "3m05s"), (7620, "2h07m")])
def test_format_seconds(seconds, text):
  assert progress.format_seconds(seconds) == text


def test_updates_from_many_threads_log_the_completion_once():
  p = progress.Progress("x", 8 * 500, "steps", interval=1e9)
  lines, lock = [], threading.Lock()

  def work(k):
    for i in range(500):
      line = p.update(8 * i + k + 1)
      if line:
        with lock:
          lines.append(line)
  threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert p.done == 4000
  assert len(lines) == 2 and lines[-1].startswith("x: 4000/4000")  # the first update and the completion


def small_diffusion():
  return dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", beta_end=0.2, num_timesteps=T))


def model_fn(x, t):
  return jnp.tanh(x) * (t[:, None, None, None] / T)


@pytest.mark.parametrize("kwargs, num_run", [(dict(), T), (dict(record_every=7), T), (dict(start_t=20), 21),
                                             (dict(num_steps=10, method="ddim", eta=0.5), 10)])
def test_sample_loop_with_progress_is_bit_identical_and_reports_in_order(kwargs, num_run):
  d = small_diffusion()
  rng = jax.random.PRNGKey(0)
  shape = (3, 4, 4, 1)
  x_init = jax.random.normal(jax.random.PRNGKey(1), shape) if "start_t" in kwargs else None
  seen = []
  plain = jax.jit(lambda r: sampling.sample_loop(model_fn, d, r, shape, x_init=x_init, **kwargs))(rng)
  reported = jax.jit(lambda r: sampling.sample_loop(model_fn, d, r, shape, x_init=x_init, progress=seen.append,
                                                    **kwargs))(rng)
  jax.effects_barrier()
  assert_trees_equal(plain, reported)
  every = progress.loop_every(num_run)
  assert seen == [num_run - i for i in range(num_run - 1, -1, -1) if i % every == 0]
  assert seen[-1] == num_run


def test_strides_of_long_chains():
  assert progress.loop_every(1000) == 10
  assert progress.loop_every(50) == 1
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=1000))
  seen = []
  sampling.sample_loop(lambda x, t: 0.1 * x, d, jax.random.PRNGKey(0), (1, 2, 2, 1), progress=seen.append)
  jax.effects_barrier()
  assert seen == list(range(10, 1001, 10))


def test_without_progress_the_program_has_no_callback():
  d = small_diffusion()
  off = str(jax.make_jaxpr(lambda r: sampling.sample_loop(model_fn, d, r, (2, 4, 4, 1)))(jax.random.PRNGKey(0)))
  on = str(jax.make_jaxpr(lambda r: sampling.sample_loop(model_fn, d, r, (2, 4, 4, 1), progress=print))(
      jax.random.PRNGKey(0)))
  assert "callback" not in off and "callback" in on


@pytest.fixture(scope="module")
def tiny_unet():
  assert jax.local_device_count() == 8, "tests run with 8 virtual CPU devices (tests/conftest.py)"
  model = unet.UNetTiny(out_ch=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
  # Stacked host copies: pmap takes them as they are (flax.jax_utils.replicate spends seconds per leaf here).
  return model, params, jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (8,) + a.shape), params)


@pytest.mark.parametrize("kwargs, num_run", [(dict(), T), (dict(num_steps=10, method="ddim", eta=0.0), 10)])
def test_sample_sharded_reports_each_step_once_across_8_devices(tiny_unet, kwargs, num_run):
  model, _, replicated = tiny_unet
  d, rng = small_diffusion(), jax.random.PRNGKey(3)
  plain = sampling.sample_sharded(model, replicated, d, rng, 16, (8, 8, 1), first_index=5, **kwargs)
  seen = []
  reported = sampling.sample_sharded(model, replicated, d, rng, 16, (8, 8, 1), first_index=5, progress=seen.append,
                                     **kwargs)
  np.testing.assert_array_equal(plain, reported)
  assert seen == list(range(1, num_run + 1))  # every step once (stride 1 here), in order: one device reports
  assert not progress._targets  # pylint: disable=protected-access  # unregistered once the samples are there


def test_a_progress_across_calls_logs_an_overall_count(tiny_unet, caplog):
  model, _, replicated = tiny_unet
  d = small_diffusion()
  report = progress.Progress("Sampling 2 shards", 2 * T, "chain steps", interval=0)
  with caplog.at_level(logging.INFO):
    for n in range(2):
      sampling.sample_sharded(model, replicated, d, jax.random.PRNGKey(0), 8, (8, 8, 1), first_index=8 * n,
                              progress=lambda done, base=n * T: report.update(base + done))
  counts = [int(r.getMessage().split(": ")[1].split("/")[0]) for r in caplog.records
            if r.getMessage().startswith("Sampling 2 shards:")]
  assert counts == list(range(1, 2 * T + 1))


def test_bits_per_dim_with_progress_is_bit_identical(tiny_unet):
  model, _, replicated = tiny_unet
  d = small_diffusion()
  data = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
  rng = jax.random.PRNGKey(4)
  plain = bpd.bits_per_dim(model, replicated, d, data, rng, first_index=3)
  seen = []
  reported = bpd.bits_per_dim(model, replicated, d, data, rng, first_index=3, progress=seen.append)
  for k in plain:
    np.testing.assert_array_equal(plain[k], reported[k])
  assert seen == list(range(1, T + 1))
