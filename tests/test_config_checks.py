"""config_checks.validate: every field of every config, at 0 and below, either means something or is refused in one
line naming it; and main.py reports a bad config file or field before it loads TensorFlow or writes anything."""
import glob
import importlib
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from ddpm_jax import config_checks
from ddpm_jax import devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))
DEVICES = 8  # conftest's virtual CPU devices

# The fields whose 0 or negative values are valid by design, and what they mean. Every other numeric field of every
# config must refuse 0 and -1, in every mode.
MEANINGFUL = {
    "seed": (0,),  # a seed like any other (the configs' own)
    "model.dropout": (0,),  # no dropout (the 256² configs)
    "optim.warmup_steps": (0,),  # no warmup: the full lr from the first step
    "optim.lr_anneal_steps": (0,),  # a constant lr after warmup (training's default)
    "optim.beta1": (0,),  # Adam without momentum
    "optim.beta2": (0,),  # Adam whose second moment is the last gradient's alone
    "optim.ema_decay": (0,),  # no averaging: the EMA params are the params
    "distill.ema_decay": (0,),  # the same for the distilled students
    "distill.first_round_steps": (0,),  # the first round as long as the others
    "distill.last_round_steps": (0,),  # the last round as long as the others
    "distill.dropout": (0,),  # students without dropout (the default, as the authors trained theirs)
    "training.log_every_steps": (0,),  # metrics only with each checkpoint
    "training.checkpoint_every_steps": (0,),  # checkpoints only at the end and on preemption
    "training.sample_every_steps": (0,),  # no sample grids
    "training.fid_every_steps": (0,),  # no FID during training (the configs' default)
    "training.fid_num_steps": (0,),  # the full chain for that FID
    "sampling.num_steps": (0,),  # all T steps (the paper's chain)
    "sampling.eta": (0,),  # deterministic DDIM
    "eval.num_samples": (0,),  # skips FID and IS; --mode=sweep, which measures FID, refuses it
    "eval.bpd_num_examples": (0, -1),  # 0 skips bits/dim; -1 = the whole split (cifar10's default)
    "model.num_classes": (0,),  # unconditional: the paper's model (every config but the *_cond ones)
    "model.class_dropout": (0,),  # every label kept (no unconditional training; guidance then has no null class)
    "sampling.guidance_scale": (0,),  # no guidance: the conditional model alone
    "edit.num_steps": (0,),  # all T steps
}
# Meaningful values refused in configs where another field needs otherwise: (field, value) → (that field, the test
# of the config under which the refusal names it).
REFUSED_BY = {("model.num_classes", 0): ("sampling.guidance_scale", lambda c: c.sampling.guidance_scale > 0)}


def get_config(name):
  return importlib.import_module(f"configs.{name}").get_config()


def flat(config):
  """{dotted field: value} of every leaf of config."""
  def walk(d, prefix):
    for k, v in d.items():
      yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
  return dict(walk(config.to_dict(), ""))


def with_value(config, field, value):
  """A copy of config with field set to value, of whatever type (ConfigDict's typed assignment would cast or refuse)."""
  d = config.to_dict()
  *groups, name = field.split(".")
  node = d
  for g in groups:
    node = node[g]
  node[name] = value
  return ml_collections.ConfigDict(d)


def without(config, *fields):
  """A copy of config without fields, like a config written before they existed."""
  d = config.to_dict()
  for field in fields:
    *groups, name = field.split(".")
    node = d
    for g in groups:
      node = node[g]
    del node[name]
  return ml_collections.ConfigDict(d)


def names(message, field):
  """Whether message names field itself (model.ch, not only model.ch_mult)."""
  return re.search(rf"(?<![\w.]){re.escape(field)}(?![\w])", message) is not None


def zero_and_negative(value):
  if isinstance(value, bool) or not isinstance(value, (int, float, tuple)):
    return []
  if isinstance(value, tuple):
    return [(0,), (-1,)] if value and all(isinstance(x, int) for x in value) else []
  return [0, -1] + ([-1.0] if isinstance(value, float) else [])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_numeric_field_at_zero_and_below_is_meaningful_or_refused_naming_it(name):
  base = get_config(name)
  passed, checked = set(), 0
  for field, value in flat(base).items():
    for bad in zero_and_negative(value):
      config = with_value(base, field, bad)
      other, applies = REFUSED_BY.get((field, bad), (field, lambda c: False))
      named = other if applies(base) else field
      for mode in config_checks.MODES:
        checked += 1
        try:
          config_checks.validate(config, mode, DEVICES)
        except ValueError as e:
          assert names(str(e), named) and "\n" not in str(e), f"{name} {field}={bad!r} --mode={mode}: {e}"
        else:
          assert bad in MEANINGFUL.get(field, ()), f"{name}: {field}={bad!r} passes --mode={mode} unexplained"
          passed.add((field, bad))
  assert checked > 300
  refused = {key for key, (_, applies) in REFUSED_BY.items() if applies(base)}
  assert passed == {(f, v) for f, values in MEANINGFUL.items() for v in values} - refused  # no stale entries


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", config_checks.MODES)
def test_every_config_validates_in_every_mode(name, mode):
  config = get_config(name)
  config_checks.validate(config, mode, DEVICES)
  config_checks.validate(config, mode, lambda: DEVICES)
  config_checks.validate(config, mode)


def test_every_field_has_a_rule_and_every_rule_a_field():
  fields = set().union(*(flat(get_config(name)) for name in CONFIGS))
  assert fields == set(config_checks.field_rules())


@pytest.mark.parametrize("field, value, message", [
    ("diffusion.beta_schedule", "linaer", "diffusion.beta_schedule = 'linaer': unknown value (did you mean 'linear'?)"
     "; use one of 'linear', 'quad', 'const', 'jsd', 'cosine'."),
    ("diffusion.model_mean_type", "epsilon", "diffusion.model_mean_type = 'epsilon': unknown value"),
    ("diffusion.model_var_type", "fixed", "diffusion.model_var_type = 'fixed': unknown value"),
    ("diffusion.loss_type", "l2", "diffusion.loss_type = 'l2': unknown value"),
    ("data.source", "cifar100", "data.source = 'cifar100': unknown value; use one of 'tfds', 'folder', 'npz'"),
    ("sampling.method", "DDIM", "sampling.method = 'DDIM': unknown value (did you mean 'ddim'?)"),
    ("sampling.checkpoint", "best", "sampling.checkpoint = 'best': unknown value (did you mean 'best_fid'?)"),
    ("model.dtype", "fp16", "model.dtype = 'fp16': unknown value; use one of 'float32', 'bfloat16', 'float16'."),
    ("model.conv_impl", "winograd", "model.conv_impl = 'winograd': unknown value; use one of 'auto', 'xla'."),
    ("data.channels", 2, "data.channels = 2: unknown value; use one of 1, 3."),
    ("model.ch", True, "model.ch = True: a bool, not an integer; use an integer >= 1"),
    ("model.ch", 1.5, "model.ch = 1.5: a float, not an integer"),
    ("data.random_flip", 1, "data.random_flip = 1: an int, not a bool; use True or False."),
    ("optim.lr", "fast", "optim.lr = 'fast': a str, not a number; use a number > 0."),
    ("optim.lr", False, "optim.lr = False: a bool, not a number"),
    ("data.path", None, "data.path = None: a NoneType, not a string"),
    ("model.ch_mult", 2, "model.ch_mult = 2: an int, not a tuple; use a non-empty tuple of integers >= 1"),
    ("model.ch_mult", (1, 2.5), "model.ch_mult = (1, 2.5): item 2.5: a float, not an integer"),
    ("model.ch_mult", (), "model.ch_mult = (): empty"),
    ("eval.sweep_methods", ("ddim", "ddpm"), "eval.sweep_methods = ('ddim', 'ddpm'): item 'ddpm': unknown value"),
    ("eval.sweep_steps", (10, True), "eval.sweep_steps = (10, True): item True: a bool, not an integer"),
    ("optim.ema_decay", 1.0, "optim.ema_decay = 1.0: out of range; use a number in [0, 1) (0 = no averaging)."),
    ("diffusion.beta_end", 1.5, "diffusion.beta_end = 1.5: out of range; use a number in (0, 1]."),
])
def test_typos_wrong_types_and_ranges_are_refused_in_one_line(field, value, message):
  for mode in config_checks.MODES:
    with pytest.raises(ValueError, match=re.escape(message)):
      config_checks.validate(with_value(get_config("cifar10"), field, value), mode, DEVICES)


def learned(config, **sampling):
  config.diffusion.model_var_type, config.diffusion.loss_type = "learned", "hybrid"
  config.sampling.update(sampling)
  return config


@pytest.mark.parametrize("mode, change, message", [
    ("train", dict(training=dict(batch_size=12)), "training.batch_size = 12: not divisible by the 8 devices; use a "
     "multiple of 8 such as 8."),
    ("train", dict(training=dict(fid_every_steps=100, fid_num_samples=12)), "training.fid_num_samples = 12: not "
     "divisible"),
    ("train", dict(training=dict(steps_per_dispatch=3, num_train_steps=700, log_every_steps=99,
                                 checkpoint_every_steps=99, sample_every_steps=99)),
     "training.num_train_steps = 700: not a multiple of "
     "training.steps_per_dispatch = 3; use a multiple of 3, such as 699."),
    ("train", dict(training=dict(fid_every_steps=100, fid_num_steps=2000)), "training.fid_num_steps = 2000: more "
     "than the diffusion's T = 1000 steps"),
    ("train", dict(training=dict(fid_every_steps=100, fid_num_steps=5, fid_method="analytic_dpm")),
     "training.fid_method = 'analytic_dpm': unknown value; use one of 'ddim', 'dpm_solver++'"),
    ("sample", dict(sampling=dict(batch_size=100)), "sampling.batch_size = 100: not divisible"),
    ("sample", dict(sampling=dict(num_steps=1001)), "sampling.num_steps = 1001: more than the diffusion's T"),
    ("eval", dict(eval=dict(bpd_batch_size=12)), "eval.bpd_batch_size = 12: not divisible"),
    ("eval", dict(sampling=dict(batch_size=100)), "sampling.batch_size = 100"),
    ("sweep", dict(eval=dict(sweep_steps=(10, 2000))), "eval.sweep_steps = (10, 2000): item 2000: more than the "
     "diffusion's T = 1000 steps; use integers from 1 to 1000."),
    ("sweep", dict(eval=dict(num_samples=0)), "eval.num_samples = 0: a sweep measures FID"),
    ("train", dict(optim=dict(lr_anneal_steps=100)), "optim.lr_anneal_steps = 100: not after the warmup's 100 "
     "steps"),
    ("distill", dict(distill=dict(steps_per_round=100)), "distill.steps_per_round = 100: a round no longer than "
     "optim.warmup_steps = 100"),
    ("distill", dict(distill=dict(first_round_steps=50)), "distill.first_round_steps = 50: a round no longer"),
    ("distill", dict(distill=dict(last_round_steps=50)), "distill.last_round_steps = 50: a round no longer"),
    ("train", dict(diffusion=dict(loss_type="hybrid")), "diffusion.loss_type = 'hybrid': needs a learned variance"),
    ("train", dict(diffusion=dict(model_var_type="learned")), "diffusion.loss_type = 'mse': L_simple cannot train"),
    ("train", dict(model=dict(ch=16)), "model.ch × ch_mult gives [16] channels, not divisible by GroupNorm"),
    ("train", dict(data=dict(image_size=10)), "image size 10 is not divisible by 2^2 = 4, which model.ch_mult of 3 "
     "levels needs; change data.image_size or model.ch_mult."),
    ("train", dict(model=dict(attn_resolutions=(4, 3))), "model.attn_resolutions [3] never occur"),
    ("train", dict(data=dict(source="folder")), "data.path = '': empty, but data.source 'folder' reads it"),
    ("eval", dict(data=dict(source="tfds", name="")), "data.name = '': empty"),
])
def test_rules_between_fields_and_modes(mode, change, message):
  config = get_config("digits")
  for group, fields in change.items():
    config[group].update(fields)
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    config_checks.validate(config, mode, DEVICES)
  assert "\n" not in str(e.value)


def test_a_learned_variance_cannot_take_respaced_ancestral_steps():
  with pytest.raises(ValueError, match=r"^sampling.num_steps = 50: with sampling method 'ancestral', model_var_type="
                     "'learned' predicts"):
    config_checks.validate(learned(get_config("cifar10"), num_steps=50), "sample", DEVICES)
  config_checks.validate(learned(get_config("cifar10"), num_steps=50, method="ddim"), "sample", DEVICES)
  with pytest.raises(ValueError, match=r"^eval.sweep_steps = \(10, 20, 50, 100, 200, 1000\): item 10: with sampling "
                     "method 'ancestral'"):
    config_checks.validate(learned(get_config("cifar10")), "sweep", DEVICES)
  config_checks.validate(learned(get_config("cifar10")), "train", DEVICES)  # the FID monitor's DDIM is fine


def test_modes_check_only_what_they_use():
  config = get_config("cifar10")
  config.diffusion.num_timesteps = 2  # as tests/test_pretrained.py samples: eval.sweep_steps go up to 1000
  config.sampling.batch_size = 12
  config_checks.validate(config, "sample", 4)
  with pytest.raises(ValueError, match="eval.sweep_steps"):
    config_checks.validate(config, "sweep", 4)
  config.data.source = "folder"  # with no data.path: sampling reads no data, training does
  config_checks.validate(config, "sample", 4)
  with pytest.raises(ValueError, match="data.path"):
    config_checks.validate(config, "train", 4)
  config.training.batch_size = 12  # multiples of the device count only where a run splits them
  config.training.fid_num_samples = 12
  config_checks.validate(config, "sample", 4)
  with pytest.raises(ValueError, match="sampling.batch_size = 12: not divisible by the 8 devices"):
    config_checks.validate(config, "sample", 8)
  config.eval.update(num_samples=0, bpd_num_examples=0, figures=False)  # an eval that samples and reads nothing
  config_checks.validate(config, "eval", 8)


def test_device_count_is_asked_only_when_every_other_rule_passes():
  asked = []
  def count():
    asked.append(1)
    return DEVICES
  with pytest.raises(ValueError, match="model.ch = 0"):
    config_checks.validate(with_value(get_config("cifar10"), "model.ch", 0), "train", count)
  assert not asked
  config_checks.validate(get_config("cifar10"), "train", count)
  assert asked == [1]
  config_checks.validate(with_value(get_config("cifar10"), "training.batch_size", 12), "train", None)  # unknown


def test_configs_older_than_a_field_are_filled_from_the_defaults_then_validate():
  lacking = ("restore_from", "model.dtype", "model.remat", "model.conv_impl", "training.fid_every_steps",
             "training.fid_num_samples", "training.fid_num_steps", "training.fid_method", "training.steps_per_dispatch",
             "sampling.checkpoint", "sampling.num_steps", "sampling.method", "sampling.eta", "sampling.clip_denoised",
             "data.num_threads")
  old = without(get_config("digits"), "eval", *lacking)
  defaults = get_config("cifar10")
  filled = config_checks.fill_missing(old, defaults)
  assert sorted(filled) == sorted(lacking + ("eval",))
  assert old.eval.to_dict() == defaults.eval.to_dict()
  for field in lacking:
    group, _, name = field.rpartition(".")
    assert (old[group] if group else old)[name] == (defaults[group] if group else defaults)[name], field
  assert old.model.ch == get_config("digits").model.ch  # the config's own values stay
  assert config_checks.fill_missing(old, defaults) == []
  for mode in config_checks.MODES:
    config_checks.validate(old, mode, DEVICES)


def test_check_divisible():
  devices.check_divisible("sampling.batch_size", 16, 8)
  with pytest.raises(ValueError, match=r"^x.n = 20: not divisible by the 8 devices; use a multiple of 8 such as 16\.$"):
    devices.check_divisible("x.n", 20, 8)
  with pytest.raises(ValueError, match="^x.n = 3: not divisible by the 2 hosts; use a multiple of 2 such as 2.$"):
    devices.check_divisible("x.n", 3, 2, "hosts")


def test_validation_imports_no_tensorflow_and_leaves_a_joining_process_backend_alone():
  """A process that is to join a cluster must not start a JAX backend before jax.distributed.initialize."""
  code = ("import sys\nfrom jax._src import xla_bridge\nfrom ddpm_jax import config_checks\n"
          "from configs import cifar10\n"
          "count = lambda: config_checks.device_count_before_joining('127.0.0.1:1234')\n"
          "for mode in config_checks.MODES:\n  config_checks.validate(cifar10.get_config(), mode, count)\n"
          "print(xla_bridge.backends_are_initialized(), config_checks.device_count_before_joining(),\n"
          "      sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu')))")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_", "TPU_WORKER"))}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", str(DEVICES), "[]"], out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# main.py end to end.

def run_main(tmp_path, *flags, config="configs/digits.py"):
  """main.py's finished process, with a workdir that does not exist yet."""
  return subprocess.run([sys.executable, "main.py", f"--config={config}", f"--workdir={tmp_path / 'run'}", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config, flags, named", [
    ("configs/nope.py", [], ["config file configs/nope.py not found; the configs are: configs/celebahq256.py, "
                             "configs/cifar10.py, configs/cifar10_cond.py, configs/digits.py"]),
    ("configs/cifar10.py", ["--config.model.ch=0"], ["model.ch = 0", "integer >= 1"]),
    ("configs/cifar10.py", ["--config.optim.lr=-1"], ["optim.lr = -1.0", "a number > 0"]),
    ("configs/cifar10.py", ["--config.training.batch_size=-4"], ["training.batch_size = -4", "integer >= 1"]),
    ("configs/digits.py", ["--config.training.batch_size=12"], ["training.batch_size = 12", "multiple of 8"]),
    ("configs/cifar10.py", ["--config.diffusion.beta_schedule=linaer"], ["beta_schedule", "did you mean 'linear'?"]),
    ("configs/digits.py", ["--mode=sweep", "--config.diffusion.num_timesteps=500"],
     ["eval.sweep_steps", "item 1000: more than the diffusion's T = 500 steps"]),
])
def test_main_refuses_a_bad_config_in_one_line_before_writing_anything(tmp_path, config, flags, named):
  proc = run_main(tmp_path, *flags, config=config)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("main.py: error: ") and all(n in last for n in named), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and len(proc.stderr) < 1000, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("source, message", [
    ("def get_config(:\n", "does not load (SyntaxError: invalid syntax"),
    ("x = 1\n", "does not load (AttributeError: module 'config_config' has no attribute 'get_config')"),
    ("def get_config():\n  return undefined\n", "does not load (NameError: name 'undefined' is not defined)"),
])
def test_main_reports_a_broken_config_file_in_one_line(tmp_path, source, message):
  (tmp_path / "mine.py").write_text(source)
  proc = run_main(tmp_path, config=str(tmp_path / "mine.py"))
  assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
  assert proc.stderr.startswith(f"main.py: error: config file {tmp_path / 'mine.py'} {message}")
  assert "use one of: configs/celebahq256.py" in proc.stderr
