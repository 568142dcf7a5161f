"""main.py command lines (a JSON list of argv on stdin), one after another in this one process, each with its flags
parsed afresh exactly as `python main.py …` parses them.

  commands_worker.py           runs each (main.main), stopping at the first that fails; its seconds go to stderr
  commands_worker.py --parse   only parses each; prints a JSON list of {ok, mode, config} or {ok, error}

One process instead of one per command: the imports (TensorFlow's alone ~3 s) happen once, and programs that two
commands share are traced and compiled once (tests/test_readme_runs.py runs a dozen documented commands;
tests/test_docs.py parses every one).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import main  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_afresh(argv):
  """main.parse_flags of `main.py argv`, with nothing left of the command parsed before; returns absl's argv."""
  sys.argv = ["main.py", *argv]  # ml_collections' config flag reads sys.argv
  for name in [n for n in main.FLAGS if n.startswith("config.")]:  # the last command's --config.FIELD overrides,
    delattr(main.FLAGS, name)  # which ml_collections defines as flags when it parses them
  main.FLAGS.unparse_flags()
  return main.parse_flags(sys.argv)


def parsed(argv):
  try:
    parse_afresh(argv)
    return dict(ok=True, mode=main.FLAGS.mode, config=main.FLAGS.config.to_dict())
  except SystemExit as e:
    return dict(ok=False, error=str(e))


if __name__ == "__main__":
  commands = json.load(sys.stdin)
  if sys.argv[1:] == ["--parse"]:
    print(json.dumps([parsed(argv) for argv in commands], default=str))
  else:
    for argv in commands:
      start = time.perf_counter()
      main.main(parse_afresh(argv))
      print(f"ran: python main.py {' '.join(argv)} ({time.perf_counter() - start:.1f} s)", file=sys.stderr,
            flush=True)
