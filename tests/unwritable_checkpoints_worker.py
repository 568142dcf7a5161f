"""main.py with its checkpoint directory made unwritable right after the step-2 checkpoint is on disk.

  python tests/unwritable_checkpoints_worker.py MAIN_PY_FLAGS...   (from the project root, as main.py is run)

A disk that breaks mid-run, without a race: the break happens inside the run, between two saves.
"""
import os
import runpy
import subprocess
import sys


def make_unwritable(path):
  """No new entries in path, even for root (CI runs as root, and chmod does not stop root)."""
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", os.fspath(path)], check=True)
  else:
    os.chmod(path, 0o555)
  try:
    open(os.path.join(path, "probe"), "w", encoding="utf-8").close()
  except OSError:
    return
  raise AssertionError(f"could not make {path} unwritable on this machine")


def make_writable(path):
  if os.geteuid() == 0:
    subprocess.run(["chattr", "-i", os.fspath(path)], check=True)
  else:
    os.chmod(path, 0o755)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  save = checkpointing.Checkpointer.save

  def save_then_break_the_disk(self, step, state, data_state):
    save(self, step, state, data_state)
    if step == 2:
      self.wait()
      make_unwritable(self.directory)
  checkpointing.Checkpointer.save = save_then_break_the_disk
  sys.argv = ["main.py"] + sys.argv[1:]
  runpy.run_path("main.py", run_name="__main__")
