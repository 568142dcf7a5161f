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

# The README runs `-n 2 --dist loadfile`: xdist hands whole files to the two workers, by default the files with the
# most tests first. That left the long multi-process and fault-injection files (2-3 tests each) for last, and one
# worker ran them alone at the end. Longest first (seconds per file, both workers busy, 2026-11-29) balances them:
# on those timings the suite's wall time falls from ≈ 1700 s to ≈ 1480 s.
_LONGEST_FILES_FIRST = (
    "test_multihost.py",  # 432 s
    "test_reliability.py",  # 308
    "test_train.py",  # 305
    "test_fault_injection.py",  # 291
    "test_unet.py",  # 198
    "test_docs.py",  # 169
    "test_sampler_sweep.py",  # 168
    "test_benchmarks.py",  # 135
    "test_pretrained.py",  # 128
    "test_notebooks.py",  # 127
    "test_evaluate.py",  # 126
    "test_samplers.py",  # 120
    "test_figures.py",  # 114; the rest take under 90 s each and keep their order
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist is installed
    config.option.loadscopereorder = False  # keep the order below


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


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
