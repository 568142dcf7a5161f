"""Progress of long stages: a rate-limited log line with an ETA, fed from the host or from inside a compiled loop.

A reverse chain or a bits/dim bound is one compiled `lax.scan` that runs for minutes: without a report from inside
it, the log says nothing until it ends. `Progress` formats and rate-limits the lines; `host_hook` and `to_target`
are the two ways traced code reaches one (a callback every `loop_every(n)` steps, which costs nothing measurable).

clu.periodic_actions.ReportProgress is not used: it is a training-step hook (steps/s to a work unit's notes and a
metric writer), not thread-safe, and its ETA is the last interval's rate rather than the stage's.
"""
import contextlib
import itertools
import threading
import time

from absl import logging
import jax
import numpy as np

REPORTS_PER_LOOP = 100  # A compiled loop calls the host at most about this often: rare enough to cost nothing.


def format_seconds(seconds):
  """'45s', '3m05s', '2h07m': short enough for a log line, precise enough for an ETA."""
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
  """Logs '<what>: <done>/<total> <unit> (<pct>%), <elapsed> elapsed, ETA <eta>' at most every `interval` seconds.

  update(done) takes the running count and may be called as often as wanted, from any thread (a compiled loop calls
  it from a device's thread): it logs the first update, then at most once per interval, and always the completion.
  Counts that do not increase are ignored. The ETA uses the rate since the first update, which leaves compilation
  and other start-up time out of it (so the first line has none: 'ETA ?').
  """

  def __init__(self, what, total, unit, *, interval=30.0, clock=time.monotonic):
    self.what, self.total, self.unit, self.interval, self._clock = what, int(total), unit, interval, clock
    self._lock = threading.Lock()
    self._start = clock()
    self._first = None  # (time, count) of the first update
    self._last_log = None
    self.done = 0

  def update(self, done):
    """Records that `done` of `total` units are finished; logs if a line is due. Returns the line logged, or None."""
    done = min(int(done), self.total)
    with self._lock:
      if done <= self.done:
        return None
      now = self._clock()
      self.done = done
      if self._first is None:
        self._first = (now, done)
      elif done < self.total and now - self._last_log < self.interval:
        return None
      self._last_log = now
      eta = self.eta(now)
      line = (f"{self.what}: {done}/{self.total} {self.unit} ({100.0 * done / max(self.total, 1):.1f}%), "
              f"{format_seconds(now - self._start)} elapsed, ETA {'?' if eta is None else format_seconds(eta)}")
      logging.info("%s", line)
      return line

  def eta(self, now):
    """Seconds left at the rate since the first update; None before a second one (0 once complete)."""
    t0, done0 = self._first
    if self.done >= self.total:
      return 0.0
    return None if self.done == done0 else (now - t0) / (self.done - done0) * (self.total - self.done)


def loop_every(num_steps):
  """The reporting stride of a compiled loop of num_steps steps: about REPORTS_PER_LOOP reports in all."""
  return max(1, -(-num_steps // REPORTS_PER_LOOP))


def host_hook(fn):
  """For traced code: hook(done) calls fn(int(done)) on the host, unordered (the program waits for nothing)."""
  return lambda done: jax.debug.callback(lambda d: fn(int(d)), done)


# A module-level pmap compiles once per static signature, so its host function cannot be a new closure per call:
# the function registers under an int id, and the id travels as an ordinary (traced) argument.
_targets = {}
_ids = itertools.count()
_targets_lock = threading.Lock()


@contextlib.contextmanager
def target(fn):
  """Registers fn(done) for `to_target` while the block runs; yields its id. Block on the results inside it."""
  with _targets_lock:
    target_id = next(_ids) % np.iinfo(np.int32).max
    _targets[target_id] = fn
  try:
    yield target_id
  finally:
    with _targets_lock:
      del _targets[target_id]


def first_device_only(target_id, num_devices):
  """int32 [num_devices] for a pmap's report_to argument: target_id on the first device, -1 (silent) elsewhere.

  Every device runs the same steps, so one reporting device is enough; the others never leave the program."""
  return np.array([target_id] + [-1] * (num_devices - 1), np.int32)


def _call_target(target_id, done):
  with _targets_lock:
    fn = _targets.get(int(target_id))
  if fn is not None:
    fn(int(done))


def to_target(report_to, done):
  """For traced code (per device): calls the fn registered as report_to with done; report_to < 0 does nothing."""
  jax.lax.cond(report_to >= 0, lambda: jax.debug.callback(_call_target, report_to, done), lambda: None)
