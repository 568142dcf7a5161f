"""ddpm-jax entry point: python main.py --config=configs/cifar10.py --workdir=DIR [--mode=train|sample|eval|sweep]."""
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (local path or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "sweep"],
                  "train: train (resuming if possible); sample: write samples; eval: FID, IS and bits/dim; "
                  "sweep: FID against the number of sampling steps (eval.sweep_methods × eval.sweep_steps).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process GPU runs without SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 … num_processes − 1 (with --coordinator_address).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "Multi-process runs: if a process dies, the others exit with an "
                     "error after this many seconds (then restart the job; it resumes from the last checkpoint).")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported once the flags are good: a mistyped flag is reported in a second, not after TensorFlow has loaded.
  # pylint: disable=g-import-not-at-top
  import jax
  import tensorflow as tf
  from ddpm_jax import cluster
  from ddpm_jax import evaluate
  from ddpm_jax import generate
  from ddpm_jax import sampler_sweep
  from ddpm_jax import train
  # pylint: enable=g-import-not-at-top
  # TensorFlow is only used for data and summaries: keep it off the accelerators JAX needs.
  tf.config.set_visible_devices([], "GPU")
  cluster.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                     FLAGS.heartbeat_timeout_seconds)
  logging.info("JAX process %d of %d; local devices %s; %d devices in all.", jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.device_count())
  logging.info("Config:\n%s", FLAGS.config)
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      logging.info("Samples in %s", generate.sample_to_dir(FLAGS.config, FLAGS.workdir))
    elif FLAGS.mode == "eval":
      evaluate.evaluate(FLAGS.config, FLAGS.workdir)
    else:
      sampler_sweep.sweep(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    if FLAGS.verbosity > 0:  # --verbosity=1 shows where it came from
      raise
    sys.exit(f"main.py: error: {e}")


def parse_flags(argv):
  """absl's flag parsing, with a mistyped --config.FIELD as one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections' unknown field, with its "Did you mean" hint
    text = str(e).replace("\\'", "'")
    name, mean = re.search(r"'([^']+)'", text), re.search(r'Did you mean "([^"]+)"', text)
    sys.exit(f"main.py: error: unknown config field {name.group(1) if name else text!r}"
             f"{f'; did you mean {mean.group(1)!r}?' if mean else '.'} Fix the --config.… flag (the config file "
             "lists every field).")
  except flags.Error as e:
    sys.exit(f"main.py: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
