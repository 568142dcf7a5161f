"""Test set-up: 8 virtual CPU devices (set before jax is imported) and strict rank promotion."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
