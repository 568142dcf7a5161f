"""Graceful stop on SIGTERM/SIGINT: the first signal asks the loop to checkpoint and exit; a second exits at once."""
import logging
import os
import signal


class GracefulStop:
  """Context manager; `requested` turns True after the first SIGTERM or SIGINT received inside it."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested:
      logging.error("Second %s: exiting now without saving.", signal.Signals(signum).name)
      os._exit(128 + signum)  # pylint: disable=protected-access  # skip cleanup: the user asked twice
    self.requested = True
    logging.warning("%s received: finishing the current step, saving a checkpoint, then exiting "
                    "(send it again to exit at once).", signal.Signals(signum).name)

  def __enter__(self):
    for sig in self.SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
