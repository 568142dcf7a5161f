"""Joining a multi-host run (TPU pod slice, SLURM or hand-started GPU processes) with `jax.distributed`."""
import logging
import os

import jax
import numpy as np


def _cluster_detected():
  """True when the environment says this process is one of several (what jax.distributed auto-detects)."""
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # TPU VM pod slice: one process per worker
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(coordinator_address=None, num_processes=None, process_id=None, heartbeat_timeout_seconds=100):
  """Calls jax.distributed.initialize for a cluster; does nothing for a single process.

  Explicit arguments (or env JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) win over detection.
  When a process dies, the others stop with an error after heartbeat_timeout_seconds instead of waiting in a
  collective forever; the job (SLURM, the TPU script) then restarts all of them from the last checkpoint.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id (or JAX_NUM_PROCESSES and "
                       "JAX_PROCESS_ID).")
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  elif _cluster_detected():
    # TPU pod / SLURM / Open MPI: JAX reads the topology from the environment.
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  else:
    return
  if jax.default_backend() == "cpu":
    _connect_cpu_collectives()
  logging.info("Joined a cluster: process %d of %d, %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _connect_cpu_collectives():
  """One all-reduce over every device of the cluster, now, while the processes are in step.

  XLA:CPU connects its (gloo) collectives at the first collective a program runs and gives the other processes
  30 s to join; a host that reaches the first train step later than that (a slower compile, a busy machine) failed
  the run with "Gloo context initialization failed: DEADLINE_EXCEEDED". The processes have just met in
  jax.distributed.initialize, so they connect here together. A connected all-reduce waits for a late peer (130 s
  was measured to pass on CPU, where 100 s before connecting failed).
  """
  ones = np.ones(jax.local_device_count(), np.int32)
  total = int(jax.pmap(lambda x: jax.lax.psum(x, "devices"), axis_name="devices")(ones)[0])
  if total != jax.device_count():
    raise RuntimeError(f"the cluster's first all-reduce counted {total} devices, not {jax.device_count()}.")
