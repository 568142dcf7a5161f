"""The launch scripts: shellcheck-clean, and --dry-run prints every command a TPU pod run needs."""
import os
import shutil
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = ["tpu_vm.sh", "gpu_local.sh", "gpu_slurm.sbatch"]


def test_tpu_dry_run_prints_the_pod_commands():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--name=pod", "--zone=us-east5-a",
                        "--accelerator=v5litepod-64", "--spot", "--workdir=gs://b/run", "--delete", "--dry-run", "--",
                        "--config.training.batch_size=512"], check=True, capture_output=True, text=True).stdout
  lines = out.splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create pod --zone=us-east5-a "
                             "--accelerator-type=v5litepod-64") and lines[0].rstrip().endswith("--spot")
  assert "tpu-vm scp --recurse" in lines[1] and "--worker=all" in lines[1]
  assert "--worker=all" in lines[2] and "jax\\[tpu\\]" in lines[2]
  assert "--worker=all" in lines[3] and "main.py" in lines[3] and "gs://b/run" in lines[3]
  assert "--config.training.batch_size=512" in lines[3]
  assert lines[4].startswith("gcloud compute tpus tpu-vm delete pod")


def test_tpu_script_refuses_a_missing_workdir():
  res = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run"], capture_output=True, text=True)
  assert res.returncode == 2 and "--workdir=gs://BUCKET/PATH is required" in res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_are_shellcheck_clean():
  subprocess.run(["shellcheck"] + [os.path.join(LAUNCH, s) for s in SCRIPTS], check=True)


def test_gpu_script_takes_paths_relative_to_where_it_was_started(tmp_path):
  """It moves to the project root to run main.py: a relative workdir must still land where the user is."""
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python").write_text('#!/bin/sh\necho "$PWD" "$@"\n')  # prints what main.py would get
  (fake / "python").chmod(0o755)
  (tmp_path / "mine.py").write_text("")
  out = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_local.sh"), "runs/x", "mine.py", "--config.seed=1"],
                       cwd=tmp_path, env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"), check=True,
                       capture_output=True, text=True).stdout.split()
  assert out[0] == os.path.dirname(LAUNCH)  # main.py runs from the project root…
  assert out[1:] == ["main.py", f"--config={tmp_path / 'mine.py'}", f"--workdir={tmp_path / 'runs' / 'x'}",
                     "--config.seed=1"]  # …with the user's paths made absolute
  gs = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_local.sh"), "gs://b/run"], cwd=tmp_path,
                      env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"), check=True, capture_output=True,
                      text=True).stdout.split()
  assert gs[1:] == ["main.py", "--config=configs/cifar10.py", "--workdir=gs://b/run"]
