"""Test set-up: 8 virtual CPU devices (set before jax is imported) and strict rank promotion."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, inherited by the xdist workers and every subprocess: the many
# short runs of the same tiny configs compile each program once instead of once per process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # pylint: disable=g-import-not-at-top

# Catches [B] vs [B, H, W, C] broadcasting slips that would otherwise pass silently.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session, exitstatus):
  """On CI (CI=true) a skipped test fails the run: a missing dependency must not hide a check."""
  if os.environ.get("CI") != "true" or exitstatus != 0:
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = reporter.stats.get("skipped", []) if reporter else []
  if skipped:
    reporter.write_line(f"CI: {len(skipped)} test(s) skipped; on CI every test must run "
                        f"(first: {skipped[0].nodeid}: {skipped[0].longrepr[-1]})", red=True)
    session.exitstatus = 1


# main.py on the tiny digits run the command-line tests share: 8×8 digits, a 0.7M-param U-Net, T = 100, batch 8,
# one CPU device; a checkpoint every 2 steps. Seconds per run once compiled (the compilation cache is shared).
TINY_FLAGS = ("--config=configs/digits.py", "--config.data.image_size=8", "--config.model.ch_mult=(1,2)",
              "--config.model.attn_resolutions=(4,)", "--config.diffusion.num_timesteps=100",
              "--config.training.batch_size=8", "--config.training.log_every_steps=1",
              "--config.training.checkpoint_every_steps=2", "--config.training.sample_every_steps=0")


def one_device_env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
