"""Interrupted at random steps, three times, then resumed: the final state equals an unkilled run's, bit for bit."""
import re
import subprocess
import sys

from conftest import REPO


def test_two_kill9s_then_a_sigterm_at_random_steps_with_that_checkpoint_corrupted_still_end_bit_equal(tmp_path):
  """One run of the harness, three interruptions (the unkilled reference and the restarts are paid for once): kill -9,
  kill -9, then SIGTERM. Each kill -9 resumes from the latest checkpoint the run completed. The SIGTERM lands mid-run;
  the run saves the step it reached, logs 'Stopped at step' and exits 0 within 30 s (it counts as survived only
  then); then that newest checkpoint is truncated, and the resume must fall back to the one before (seed 9: the runs
  are stopped after 9, 7 and 6 steps, long enough for Orbax to complete a checkpoint or two in the background)."""
  out = subprocess.run([sys.executable, "benchmarks/fault_injection.py", "--kills=3", "--signal=KILL,KILL,TERM",
                        "--corrupt_latest=TERM", "--steps=24", "--seed=9", f"--workdir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  kills = [line for line in out.stdout.splitlines() if line.startswith("kill ")]
  assert [line.split()[3] for line in kills] == ["KILL", "KILL", "TERM"], kills
  resumed = [int(re.search(r"resuming from step (\d+)$", line).group(1)) for line in kills]
  assert max(resumed[:2]) > 0, kills  # a kill -9 resumed from a checkpoint, not from scratch (3 and 6 seen)
  truncated = re.search(r"checkpoint (\d+) truncated", kills[2])
  assert truncated and resumed[2] < int(truncated.group(1)), kills  # the SIGTERM's save, passed over
  assert "kills survived / kills tried: 3 / 3" in out.stdout and "final params equal: True" in out.stdout


def test_a_kill9_and_a_sigterm_in_different_distillation_rounds_still_end_bit_equal(tmp_path):
  """--mode=distill killed for real: rounds 4 → 2 and 2 → 1 of 8 steps each, a checkpoint every 3. Seed 16 stops the
  first run after 7 steps (kill -9 in round 4 → 2, which resumes from its step 3 or 6) and the rerun 9 steps on
  (SIGTERM in round 2 → 1, whichever checkpoint of round 4 → 2 it resumed from); the last rerun skips the finished
  round and completes the other, and both students equal an unkilled run's, bit for bit."""
  out = subprocess.run([sys.executable, "benchmarks/fault_injection.py", "--mode=distill", "--kills=2",
                        "--signal=KILL,TERM", "--steps=8", "--seed=16", f"--workdir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  kills = [line for line in out.stdout.splitlines() if line.startswith("kill ")]
  assert len(kills) == 2 and "signal KILL" in kills[0] and "signal TERM" in kills[1], kills
  assert " of distill/2;" in kills[0] and " of distill/1;" in kills[1], kills  # one kill in each round
  assert "kills survived / kills tried: 2 / 2" in out.stdout and "final params equal: True" in out.stdout
