"""Parses main.py command lines (JSON list of argv on stdin) exactly as main.py would; prints JSON results.

Imports main once, then forks per command so each parse starts from unparsed flags (ml_collections' config flag
reads sys.argv, so the child sets it too).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import main  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_in_child(argv):
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(read_end)
    try:
      sys.argv = ["main.py", *argv]
      main.parse_flags(sys.argv)
      result = dict(ok=True, mode=main.FLAGS.mode, config=main.FLAGS.config.to_dict())
    except SystemExit as e:
      result = dict(ok=False, error=str(e))
    with os.fdopen(write_end, "w") as f:
      json.dump(result, f, default=str)
    os._exit(0)  # pylint: disable=protected-access
  os.close(write_end)
  with os.fdopen(read_end) as f:
    text = f.read()
  os.waitpid(pid, 0)
  return json.loads(text)


if __name__ == "__main__":
  print(json.dumps([parse_in_child(argv) for argv in json.load(sys.stdin)]))
