#!/bin/bash
# Train on every worker of a TPU VM pod slice at once.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE -- --config=configs/pretrain.py:lapa_lwm7b \
#       --workdir=gs://BUCKET/runs/lapa7b --config.data.data_dir=gs://BUCKET/tfds
#
# Creates the slice when it does not exist (reuses it otherwise), copies this checkout (git HEAD)
# to every worker, builds a venv there with the [tpu] extra, then runs python -m jaxvla.train with
# the arguments after "--" on all workers simultaneously (gcloud ... ssh --worker=all). The
# trainer joins the multi-host run by itself (TPU_WORKER_HOSTNAMES). Each worker logs to
# ~/jaxvla/logs/<run>/<hostname>.log; the merged stream is also saved here in
# logs/tpu-<NAME>-<run>.log. Workdirs and data_dirs on gs:// work unchanged (TF's file system).
#
# Environment: PROJECT (gcloud project, default: gcloud's), RUNTIME (TPU software version, default
# tpu-ubuntu2204-base), SPOT=1 (preemptible capacity; the trainer saves on SIGTERM and resumes),
# SKIP_SETUP=1 (code and venv already on the workers).
set -euo pipefail

if [ "$#" -lt 4 ] || [ "$4" != "--" ]; then
  echo "usage: launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE -- <python -m jaxvla.train arguments>" >&2
  exit 2
fi
NAME="$1"; ZONE="$2"; TYPE="$3"; shift 4
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
RUN="$(date +%Y%m%d-%H%M%S)"
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_FLAG=()
if [ -n "${PROJECT:-}" ]; then PROJECT_FLAG=(--project "$PROJECT"); fi

if ! "${GCLOUD[@]}" describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" >/dev/null 2>&1; then
  echo "creating TPU slice $NAME ($TYPE, $RUNTIME) in $ZONE"
  CREATE_FLAGS=(--zone "$ZONE" --accelerator-type "$TYPE" --version "$RUNTIME")
  if [ "${SPOT:-0}" = "1" ]; then CREATE_FLAGS+=(--spot); fi
  "${GCLOUD[@]}" create "$NAME" "${CREATE_FLAGS[@]}" "${PROJECT_FLAG[@]}"
else
  echo "reusing TPU slice $NAME in $ZONE"
fi

ssh_all() {
  "${GCLOUD[@]}" ssh "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

if [ "${SKIP_SETUP:-0}" != "1" ]; then
  ARCHIVE="$(mktemp -t jaxvla-XXXXXX).tar.gz"
  git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
  "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:jaxvla.tar.gz" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
  rm -f "$ARCHIVE"
  # Same venv recipe as the Makefile: the package with the tpu extra, the text tokenizer's wheel
  # without its dependencies.
  ssh_all "set -e; rm -rf ~/jaxvla && mkdir -p ~/jaxvla && tar -xzf ~/jaxvla.tar.gz -C ~/jaxvla && cd ~/jaxvla \
    && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]' \
    && .venv/bin/pip install -q --no-deps mistral-common==1.13.1"
fi

ARGS="$(printf '%q ' "$@")"
mkdir -p "$REPO/logs"
echo "running on every worker of $NAME: python -m jaxvla.train $ARGS"
ssh_all "cd ~/jaxvla && mkdir -p logs/$RUN && TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m jaxvla.train $ARGS \
  2>&1 | tee logs/$RUN/\$(hostname).log" 2>&1 | tee "$REPO/logs/tpu-$NAME-$RUN.log"
