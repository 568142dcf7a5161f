"""ddpm-jax entry point: python main.py --config=configs/cifar10.py --workdir=DIR
[--mode=train|sample|eval|sweep|distill|edit]."""
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddpm_jax import paths
from ddpm_jax import xla_cpu

FLAGS = flags.FLAGS
_MODULES = dict(eval="evaluate")  # --mode → ddpm_jax/modes/<module>.py where the names differ
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (local path or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "sweep", "distill", "edit"],
                  "train: train (resuming if possible); sample: write samples; eval: FID, IS and bits/dim; "
                  "sweep: FID against the number of sampling steps (eval.sweep_methods × eval.sweep_steps); "
                  "distill: progressive distillation into few-step students (config.distill); "
                  "edit: inpaint or SDEdit images with the trained model (config.edit).")
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
  # Every field, before anything heavy is imported or anything written: a bad value is one line within a second.
  # pylint: disable=g-import-not-at-top
  from configs import cifar10  # every config derives from it: its fields are the defaults
  from ddpm_jax import config_checks  # JAX only, no TensorFlow
  # pylint: enable=g-import-not-at-top
  filled = config_checks.fill_missing(FLAGS.config, cifar10.get_config())
  if filled:
    logging.warning("The config lacks %s; using configs/cifar10.py's values.", ", ".join(filled))
  xla_cpu.apply(FLAGS.config)  # before anything starts JAX's backend (validate may count devices): read once
  try:
    config_checks.validate(FLAGS.config, FLAGS.mode,
                           lambda: config_checks.device_count_before_joining(FLAGS.coordinator_address))
  except ValueError as e:
    sys.exit(f"main.py: error: {e}")
  # Every path the user typed, relative to the directory the command was started in (gs://… unchanged).
  workdir = paths.absolute(FLAGS.workdir)
  paths.absolute_config_paths(FLAGS.config)
  # Imported once the flags are good: a mistyped flag is reported in a second, not after JAX has loaded. Only the
  # mode that runs is imported; TensorFlow only by the modes that read data or write summaries (tensorflow_cpu.py).
  # pylint: disable=g-import-not-at-top
  import importlib
  import jax
  from ddpm_jax import checkpointing
  from ddpm_jax import cluster
  from ddpm_jax import distillation
  from ddpm_jax import recorded_config
  # pylint: enable=g-import-not-at-top
  mode = importlib.import_module(f"ddpm_jax.modes.{_MODULES.get(FLAGS.mode, FLAGS.mode)}")
  cluster.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                     FLAGS.heartbeat_timeout_seconds)
  logging.info("JAX process %d of %d; local devices %s; %d devices in all.", jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.device_count())
  logging.info("Config:\n%s", FLAGS.config)
  config = FLAGS.config
  try:
    if FLAGS.mode != "train":  # params read as they were trained (training checks its own resume)
      recorded_config.check_readable(config, workdir)
    if FLAGS.mode in ("sample", "eval", "sweep", "edit"):  # sampling.checkpoint='distill/<steps>': that round's student
      config, workdir = distillation.student_run(config, workdir)
    if FLAGS.mode == "train":
      mode.train_and_evaluate(config, workdir)
    elif FLAGS.mode in ("sample", "edit"):
      logging.info("%s in %s", "Samples" if FLAGS.mode == "sample" else "Edits", mode.run(config, workdir))
    else:
      mode.run(config, workdir)
  except checkpointing.SaveError as e:
    # Orbax's helper threads of the failed save wait minutes for a directory that will never appear; every earlier
    # checkpoint is complete on disk, so exit now instead of joining them.
    logging.flush()
    print(f"main.py: error: {e}", file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access
  except (ValueError, FileNotFoundError) as e:
    if FLAGS.verbosity > 0:  # --verbosity=1 shows where it came from
      raise
    sys.exit(f"main.py: error: {e}")


def _config_file_error(argv, error):
  """The one-line error for a --config file that is missing or does not load, listing the configs there are."""
  import glob  # pylint: disable=g-import-not-at-top
  path = "?"
  for i, arg in enumerate(argv):  # the last --config wins, as in absl
    if arg.startswith(("--config=", "-config=")):
      path = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      path = argv[i + 1]
  path = path.split(":", 1)[0]  # config.py:ARG passes ARG to get_config
  configs = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "[!_]*.py")))
  known = ", ".join(os.path.relpath(c) for c in configs)
  if not os.path.isfile(path):
    return f"main.py: error: config file {path} not found; the configs are: {known}."
  lines = str(error).strip().splitlines()
  why = lines[-1].strip() if isinstance(error, flags.Error) else f"{type(error).__name__}: {lines[0] if lines else ''}"
  return f"main.py: error: config file {path} does not load ({why}); fix it, or use one of: {known}."


def parse_flags(argv):
  """absl's flag parsing, with a mistyped --config.FIELD or a missing or broken config file as one line."""
  try:
    parsed = FLAGS(argv)
    getattr(FLAGS.config, "seed", None)  # ml_collections reports a missing config file only when it is first read
    return parsed
  except OSError as e:  # the config file is missing or unreadable
    sys.exit(_config_file_error(argv, e))
  except (AttributeError, KeyError) as e:  # ml_collections' unknown field, with its "Did you mean" hint
    if "get_config" in str(e):  # the config file defines no get_config()
      sys.exit(_config_file_error(argv, e))
    text = str(e).replace("\\'", "'")
    name, mean = re.search(r"'([^']+)'", text), re.search(r'Did you mean "([^"]+)"', text)
    sys.exit(f"main.py: error: unknown config field {name.group(1) if name else text!r}"
             f"{f'; did you mean {mean.group(1)!r}?' if mean else '.'} Fix the --config.… flag (the config file "
             "lists every field).")
  except flags.Error as e:
    if "Error whilst parsing config file" in str(e):  # ml_collections: get_config() raised a TypeError or ValueError
      sys.exit(_config_file_error(argv, e))
    sys.exit(f"main.py: error: {e}")
  except Exception as e:  # pylint: disable=broad-except  # anything else is the config file's code failing
    sys.exit(_config_file_error(argv, e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
