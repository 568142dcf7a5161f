"""A thin wrapper over `orbax.checkpoint.CheckpointManager`: the train state plus the data position, per step."""
import logging
import os
import time

import jax
import orbax.checkpoint as ocp

from ddpm_jax import errors
from ddpm_jax import fileio
from ddpm_jax import paths


class SaveError(RuntimeError):
  """A checkpoint could not be written. Training must stop: every step after it would be lost to a preemption."""


class Checkpointer:
  """Saves {'state': pytree, 'data': JSON dict} under directory/<step>; async, keeps the newest `max_to_keep`.

  Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save leaves
  the previous checkpoint as the latest one. A checkpoint that is complete on disk but unreadable (truncated or
  corrupted later) is moved aside, never deleted, and the previous one is restored instead. A save that fails, at
  once or in Orbax's background thread, raises SaveError at the next `save`, `raise_if_save_failed` or `wait`.
  Close it when done (`close`, or use it as a context manager), which releases Orbax's threads.
  """

  def __init__(self, directory, *, max_to_keep=3, async_save=True):
    self.directory = paths.absolute(directory)  # Orbax refuses relative paths
    self._unconfirmed_step = None  # the step of an asynchronous save not yet known to have succeeded
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state):
    """Saves a host (NumPy) state, identical on every process, and a JSON-serialisable data position."""
    self.raise_if_save_failed(block=True)
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state)))
    except Exception as e:  # pylint: disable=broad-except  # whatever Orbax or the filesystem raised
      raise self._save_error(step, e) from e
    self._unconfirmed_step = step

  def raise_if_save_failed(self, block=False):
    """Raises SaveError if the last asynchronous save failed; without block, never waits for one still running.

    Cheap enough to call after every train step, so a broken disk stops the run within a step of Orbax noticing.
    """
    if self._unconfirmed_step is None or (not block and self.manager.is_saving_in_progress()):
      return
    step, self._unconfirmed_step = self._unconfirmed_step, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e

  def _save_error(self, step, error):
    reason = str(error).strip().splitlines()
    good = [s for s in self.manager.all_steps() if s != step and fileio.isdir(os.path.join(self.directory, str(s)))]
    last = f"step {max(good)}" if good else "none"
    return SaveError(f"saving the checkpoint of step {step} to {self.directory} failed ({type(error).__name__}: "
                     f"{reason[0] if reason else 'no message'}); the last complete checkpoint ({last}) is kept. Fix "
                     "the cause (disk full? permissions?) and rerun the same command to resume from it.")

  def _restore_step(self, step, abstract_state):
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore(self, abstract_state):
    """(state, data_state) of the newest readable checkpoint, shaped like abstract_state; None if there is none."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        result = self._restore_step(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint: fall back, keep it on disk
        previous = steps[i + 1] if i + 1 < len(steps) else None
        logging.warning("Checkpoint of step %d in %s is unreadable (%s: %s); falling back to step %s.", step,
                        self.directory, type(e).__name__, errors.first_line(e), previous)
        self._move_aside(step)
        continue
      logging.info("Restored checkpoint of step %d from %s", step, self.directory)
      return result
    if steps:
      raise ValueError(f"no readable checkpoint in {self.directory} (tried steps {steps}; they were moved aside as "
                       "<step>.unreadable-*); restore them from a backup or start a new workdir.")
    return None

  def _move_aside(self, step):
    # Keep the bytes for inspection, out of Orbax's way, so training can save this step number again.
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      fileio.rename(src, f"{src}.unreadable-{int(time.time())}")  # also on gs://
    self.manager.reload()

  def reached_preemption(self, step):
    """True when the JAX runtime has seen a preemption notice (multi-host pods); all hosts agree on it."""
    return self.manager.reached_preemption(step)

  def wait(self):
    """Blocks until an async save has finished writing; SaveError if it failed."""
    self.raise_if_save_failed(block=True)

  def close(self):
    """Waits for an async save still running, then stops Orbax's threads."""
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      if exc is None:
        raise
      # Already failing: that error is the one to report, not a second one from closing.


def abstract_like(tree):
  """Shapes and dtypes of a pytree, without shardings: Orbax then restores host NumPy arrays on every process."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
