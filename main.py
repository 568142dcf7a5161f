"""ddpm-jax entry point: python main.py --config=configs/cifar10.py --workdir=DIR [--mode=train|sample]."""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from ddpm_jax import cluster
from ddpm_jax import generate
from ddpm_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (local path or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "sample"], "train: train (resuming if possible); sample: write samples.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process GPU runs without SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 … num_processes − 1 (with --coordinator_address).")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TensorFlow is only used for data and summaries: keep it off the accelerators JAX needs.
  tf.config.set_visible_devices([], "GPU")
  cluster.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("JAX process %d of %d; local devices %s; %d devices in all.", jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.device_count())
  logging.info("Config:\n%s", FLAGS.config)
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    out_dir = generate.sample_to_dir(FLAGS.config, FLAGS.workdir)
    logging.info("Samples in %s", out_dir)


if __name__ == "__main__":
  app.run(main)
