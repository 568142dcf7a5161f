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
