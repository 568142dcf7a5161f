#!/usr/bin/env bash
# One machine, all its GPUs, one process: pmap spreads the batch over every visible GPU.
#
#   launch/gpu_local.sh WORKDIR [CONFIG] [--config.field=value ...]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: launch/gpu_local.sh WORKDIR [CONFIG] [overrides...]" >&2
  exit 2
fi
workdir="$1"; shift
config="${1:-configs/cifar10.py}"; [ $# -gt 0 ] && shift
# Paths typed relative to where the script was started, not to the project root it moves to (gs://… unchanged).
case "$workdir" in /*|*://*) ;; *) workdir="$PWD/$workdir" ;; esac
case "$config" in /*) ;; *) [ -f "$config" ] && config="$PWD/$config" ;; esac
cd "$(dirname "$0")/.."
# Let JAX take GPU memory as it needs it, and keep TensorFlow (data, summaries) off the GPUs.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
exec python main.py --config="$config" --workdir="$workdir" "$@"
