"""Python scripts run one after another in this one process, each as `python SCRIPT ARGS…` would run it (run as
__main__ with its argv, its directory first on sys.path). Used by tests/test_benchmarks.py, not collected by pytest.

  scripts_worker.py < argvs.json   a JSON list of [script, arg, …]; each script's stdout follows a line `=== SCRIPT`

Stops at the first script that fails: its traceback on stderr, exit status 1. One process instead of one per script:
the imports they share (JAX, PyTorch and diffusers: ~5 CPU-s) happen once.
"""
import json
import os
import runpy
import sys

MARK = "=== "


def run(argv):
  sys.argv = list(argv)
  sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
  try:
    runpy.run_path(argv[0], run_name="__main__")
  except SystemExit as e:  # argparse's errors and sys.exit(status): only 0 (or None) counts as success
    if e.code not in (None, 0):
      raise
  finally:
    sys.path.pop(0)


if __name__ == "__main__":
  for script_argv in json.load(sys.stdin):
    print(MARK + script_argv[0], flush=True)
    run(script_argv)
    sys.stdout.flush()
