"""Runs main.py command lines (a JSON list of argv on stdin) one after another in this one process, each as
`python main.py …` would: its flags parsed afresh, then main.main. Stops at the first that fails.

One process instead of one per command: the imports (TensorFlow's alone ~3 s) happen once, and programs that two
commands share are traced and compiled once (tests/test_readme_runs.py runs a dozen documented commands).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  for argv in json.load(sys.stdin):
    start = time.perf_counter()
    sys.argv = ["main.py", *argv]  # ml_collections' config flag reads sys.argv
    for name in [n for n in main.FLAGS if n.startswith("config.")]:  # the last command's --config.FIELD overrides,
      delattr(main.FLAGS, name)  # which ml_collections defines as flags when it parses them
    main.FLAGS.unparse_flags()
    main.main(main.parse_flags(sys.argv))
    print(f"ran: python main.py {' '.join(argv)} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
