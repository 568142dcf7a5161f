"""One process of a 2-process cluster on 127.0.0.1 (run by tests/test_multihost.py, not collected by pytest).

argv: coordinator_port process_id workdir heartbeat_timeout_seconds action [action …], each action run in turn:
  train:N           train to step N (resuming), then write params_step<N>_process<i>.npz
  sample_eval:N     evaluate the step-N checkpoint (sample shards, FID and bits/dim in workdir/eval), then sample
  edit:N            inpaint with the step-N checkpoint (the latest): conftest.tiny_edit_config, into workdir/edit
  slow_compile:S    from now on process 1 reaches each first train step S seconds after process 0 (a slow host)
"""
import os
import sys
import time

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
# conftest asks for the test process's 8 devices; this process's 2 are set after it, before JAX starts a backend,
# with the compile flags of the test process (which trains the one-process reference).
from conftest import (multihost_eval_config, save_params, tiny_config, tiny_edit_config,  # pylint: disable=g-import-not-at-top
                      xla_flags)
os.environ["XLA_FLAGS"] = xla_flags(2)
os.environ["JAX_PLATFORMS"] = "cpu"

import logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top

from ddpm_jax import cluster  # pylint: disable=g-import-not-at-top
from ddpm_jax.modes import train  # pylint: disable=g-import-not-at-top
from ddpm_jax import train_step  # pylint: disable=g-import-not-at-top


def _delayed(fn, seconds):
  def late(*args):
    time.sleep(seconds)
    return fn(*args)
  return late


port, pid, workdir, heartbeat = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
logging.getLogger().setLevel(logging.INFO)  # the test reads where training started
cluster.initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_seconds=heartbeat)
assert jax.process_count() == 2 and jax.device_count() == 4
for action in sys.argv[5:]:
  mode, steps = action.split(":")
  config = tiny_config(num_train_steps=int(steps))
  if mode == "slow_compile":
    if pid == 1:
      train_step.compiled_train_steps = _delayed(train_step.compiled_train_steps, int(steps))
  elif mode == "train":
    state = train.train_and_evaluate(config, workdir)
    save_params(workdir, steps, pid, state)
  elif mode == "edit":
    from ddpm_jax.modes import edit  # pylint: disable=g-import-not-at-top
    print("edited", edit.run(tiny_edit_config(int(steps)), workdir), flush=True)
  else:
    from ddpm_jax.modes import evaluate  # pylint: disable=g-import-not-at-top
    from ddpm_jax.modes import sample  # pylint: disable=g-import-not-at-top
    print("results", evaluate.run(multihost_eval_config(config, workdir), workdir), flush=True)
    sample.run(config, workdir)
