#!/usr/bin/env bash
# Runs cpt_jax.main on every worker of a Cloud TPU VM slice (one process per worker; JAX
# finds the other workers from the TPU metadata, so no coordinator settings are needed).
#
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh --config=configs/cpt/sft.py --workdir=gs://bucket/run
#
# Env: TPU, ZONE (required), PROJECT (gcloud default if unset), REPO_DIR (directory of this
# repository on the workers, default cpt_jax), PYTHON (default .venv/bin/python, relative to
# REPO_DIR), MODULE (cpt_jax.main). The code and its venv must already be on every worker
# (see launch/README.md).
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR=${REPO_DIR:-cpt_jax}
PYTHON=${PYTHON:-.venv/bin/python}
MODULE=${MODULE:-cpt_jax.main}

args=$(printf ' %q' "$@")
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project "$PROJECT"); fi

exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${project[@]}" --worker=all \
  --command "cd $REPO_DIR && $PYTHON -m $MODULE$args"
