#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install HIPT-JAX on every worker, run the SAME hipt-pretrain
# command on all workers (one JAX process per host; jax.distributed auto-detects the slice).
#
#   export TPU_NAME=hipt-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 RUNTIME=tpu-ubuntu2204-base
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh setup                      # copies this checkout, pip installs hipt-jax[tpu]
#   launch/tpu_pod.sh mount BUCKET /mnt/BUCKET     # gcsfuse: the bucket at one path on every worker
#   launch/tpu_pod.sh run --config configs/pretrain_vit256.py --workdir /mnt/BUCKET/runs/vit256 \
#       --config.data.kind=patch_shards --config.data.path=/mnt/BUCKET/prep/patches \
#       --config.global_batch=1024
#   launch/tpu_pod.sh logs | ssh | delete
#   launch/tpu_pod.sh --dry-run run ...          # (or DRY_RUN=1) print every command, run none
#   MODULE=hipt_jax.cli.extract launch/tpu_pod.sh run --vit256 A --vit4k B --shards P --out E
#
# MODULE (default hipt_jax.pretrain): the python -m module every worker runs (its log:
# REMOTE_DIR/<last part of MODULE>.log), e.g. hipt_jax.cli.extract (each host embeds its share of
# the slides). REMOTE_DIR (default hipt-jax, under the worker's home): where setup installs.
#
# Global batch: --config.global_batch is the batch of the whole slice; each host feeds
# global_batch / num_hosts examples (its own slice of the shuffled data, by jax.process_index()),
# and every device holds global_batch / num_devices. lr scales with global_batch / 256 (as DINO).
# --workdir must be on storage every host sees (a bucket mounted with gcsfuse at one path on every
# worker, or NFS); checkpoints resume from it. gs:// URLs are refused: commands read and write files.
set -euo pipefail

if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE (e.g. us-central2-b)}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR="${REMOTE_DIR:-hipt-jax}"
MODULE="${MODULE:-hipt_jax.pretrain}"
if [[ ! "$MODULE" =~ ^hipt_jax(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]]; then
  echo "tpu_pod.sh: MODULE=$MODULE: not a hipt_jax module (e.g. hipt_jax.pretrain, hipt_jax.cli.extract)" >&2
  exit 2
fi
LOG="${MODULE##*.}.log"
# Remote commands are one shell string: the folder goes in quoted, as the run's own arguments do.
RDIR=$(printf '%q' "$REMOTE_DIR")
# One tarball name per user and invocation: a fixed /tmp name was shared by every user of the
# machine (and of each worker), and two setups at once overwrote each other's.
TARBALL="/tmp/hipt-jax-$(id -un)-$$.tgz"
# setup installs the package with this extra: tpu (libtpu matching the jax pin), or e.g. tpu,convert.
EXTRA="${EXTRA:-tpu}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"

# Every command of this script goes through x: run it, or with --dry-run print it (shell-quoted,
# one line each) and run nothing.
x() { if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
tpu() { x gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot}
    ;;
  setup)
    # Ship this checkout (code only) to every worker, then install it with the TPU extra (one pip
    # command, so the resolver sees jax and libtpu together).
    [[ "$DRY_RUN" == 1 ]] || trap 'rm -f "$TARBALL"' EXIT
    x tar -C "$REPO_DIR" --exclude=.venv --exclude=.git --exclude=demo_out -czf "$TARBALL" .
    tpu scp "$TARBALL" "$TPU_NAME":"$TARBALL" --worker=all
    on_all "mkdir -p $RDIR && tar -C $RDIR -xzf $TARBALL && rm -f $TARBALL && cd $RDIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e '.[$EXTRA]' \
        -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    ;;
  run)
    # The same command on every host, in the background with a log file per host.
    args=$(printf ' %q' "$@")
    on_all "cd $RDIR && nohup .venv/bin/python -m $MODULE$args > $LOG 2>&1 &"
    [[ "$DRY_RUN" == 1 ]] || echo "started on all workers; follow with: $0 logs"
    ;;
  mount)
    # Commands read and write files (gs:// URLs are refused), so the bucket is mounted with gcsfuse
    # at the same path on every worker (the image must have gcsfuse; TPU VMs allow sudo).
    if [[ -z "${1:-}" ]]; then echo "usage: $0 mount BUCKET [DIR]" >&2; exit 2; fi
    bucket="$1"; dir="${2:-/mnt/$bucket}"
    qb=$(printf '%q' "$bucket"); qd=$(printf '%q' "$dir")
    on_all "sudo mkdir -p $qd && sudo chown \$(id -u):\$(id -g) $qd && gcsfuse --implicit-dirs $qb $qd"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker=0 --command="tail -f $RDIR/$LOG"
    ;;
  ssh)
    tpu ssh "$TPU_NAME" --worker="${1:-0}"
    ;;
  stop)
    on_all "pkill -f 'python -m $MODULE' || true"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "usage: $0 create|setup|mount BUCKET [DIR]|run ARGS...|logs|ssh [WORKER]|stop|delete" >&2
    exit 2
    ;;
esac
