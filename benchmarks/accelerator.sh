#!/usr/bin/env bash
# ddpm-jax against PyTorch/diffusers on this machine's accelerator (one GPU, or one core of a TPU VM), ≤ 8 minutes:
# train steps/s in float32 and bfloat16 with FLOP utilisation, sampler images/s, compile times, a summary table.
#
#   bash benchmarks/accelerator.sh [--no-install] [--tiny] [options of benchmarks/bench_accelerator.py]
#
# First it installs what the run needs into the current Python environment ($PYTHON, default python3): torch, this
# package and diffusers, with jax[cuda12] when nvidia-smi sees a GPU or jax[tpu] on a TPU VM. --no-install skips that
# (an environment set up already); --tiny installs nothing and runs the tiny model on the CPU, a smoke test of every
# code path.
set -euo pipefail
cd "$(dirname "$0")/.."

install=1
args=()
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    --tiny) install=0; args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done

python="${PYTHON:-python3}"
if [ "$install" = 1 ]; then
  jax=jax
  torch_index=()
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    jax="jax[cuda12]"
  elif [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then  # TPU VMs: /dev/accel* up to v4, vfio from v5e
    jax="jax[tpu]"
    torch_index=(--index-url https://download.pytorch.org/whl/cpu)  # torch has only the host CPU here: its CPU build
  else
    echo "accelerator.sh: no GPU (nvidia-smi) or TPU found; JAX and PyTorch will run on the CPU." >&2
  fi
  "$python" -m pip install -U torch ${torch_index[@]+"${torch_index[@]}"}
  "$python" -m pip install -U -e . diffusers "$jax"  # one resolve: the accelerator's jaxlib matches the package's jax
fi

# Let JAX take GPU memory as it needs it: PyTorch shares the device in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec "$python" benchmarks/bench_accelerator.py ${args[@]+"${args[@]}"}
