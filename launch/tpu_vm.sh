#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, install ddpm-jax on every worker, run main.py on all of them, stream logs.
#
#   launch/tpu_vm.sh --name=ddpm --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=gs://BUCKET/ddpm/cifar10 [--config=configs/cifar10.py] [--spot] [--delete] [--dry-run] \
#       [-- --config.training.batch_size=256 ...]
#
# Every worker runs the same command; jax.distributed detects the pod from the TPU environment, each host reads
# its own data shard and process 0 writes logs and samples. --dry-run prints the commands instead of running them.
set -euo pipefail

name="ddpm-jax"
zone="us-central2-b"
accelerator="v4-8"
version="tpu-ubuntu2204-base"
config="configs/cifar10.py"
workdir=""
spot=0
delete=0
dry_run=0
extra=()

usage() { sed -n '2,10p' "$0"; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --spot) spot=1 ;;
    --delete) delete=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$workdir" ]; then
  echo "tpu_vm.sh: --workdir=gs://BUCKET/PATH is required (a GCS path every worker can write)" >&2
  exit 2
fi

run() {
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

repo_dir="$(cd "$(dirname "$0")/.." && pwd)"
create=(gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator"
        --version="$version")
[ "$spot" = 1 ] && create+=(--spot)
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all)

run "${create[@]}"
run gcloud compute tpus tpu-vm scp --recurse "$repo_dir" "$name":ddpm-jax --zone="$zone" --worker=all
run "${ssh_all[@]}" --command="cd ddpm-jax && pip install -q 'jax[tpu]' -e ."
train_cmd="cd ddpm-jax && python main.py --config=$config --workdir=$workdir"
for arg in "${extra[@]+"${extra[@]}"}"; do train_cmd+=" $(printf '%q' "$arg")"; done
# Logs of every worker stream here; process 0's carry the metrics.
run "${ssh_all[@]}" --command="$train_cmd"
if [ "$delete" = 1 ]; then
  run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
fi
