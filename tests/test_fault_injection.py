"""kill -9 at random steps, three times, then resume: the final state equals an unkilled run's, bit for bit."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Shared by both tests: the uninterrupted reference run and the compiled programs are made once."""
  return tmp_path_factory.mktemp("faults")


def test_three_random_kill9s_leave_the_final_params_bit_equal(workdir):
  out = subprocess.run([sys.executable, "benchmarks/fault_injection.py", "--kills=3", "--steps=24", "--seed=1",
                        f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert "kills survived / kills tried: 3 / 3" in out.stdout and "final params equal: True" in out.stdout


def test_sigterms_save_and_exit_zero_and_with_the_latest_checkpoint_corrupted_each_time_still_end_bit_equal(workdir):
  """The harness's other two modes at once. Each SIGTERM lands mid-run; the run saves the step it reached, logs
  'Stopped at step' and exits 0 within 30 s (a kill counts as survived only then). Then the newest checkpoint is
  truncated before each resume, which must fall back to the one before."""
  out = subprocess.run([sys.executable, "benchmarks/fault_injection.py", "--kills=2", "--signal=TERM",
                        "--corrupt_latest", "--steps=24", "--seed=2", f"--workdir={workdir}"], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert "kills survived / kills tried: 2 / 2" in out.stdout and "final params equal: True" in out.stdout
