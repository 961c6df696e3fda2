#!/usr/bin/env bash
# N CPU processes on this machine, each with fake devices: a multi-host run in miniature.
#
#   launch/local_cpu.sh --config=configs/demo/sft.py:runlocal --workdir=/tmp/run
#
# Env: NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), PORT (free loopback port), PYTHON
# (.venv/bin/python if present), MODULE (cpt_jax.main), LOG_DIR (/tmp/cpt_jax_local_cpu).
# Process i logs to $LOG_DIR/process_$i.log; process 0 is also echoed here. Needs bash >= 5.1.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
MODULE=${MODULE:-cpt_jax.main}
LOG_DIR=${LOG_DIR:-/tmp/cpt_jax_local_cpu}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$LOG_DIR"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
  COORDINATOR_ADDRESS="127.0.0.1:$PORT" \
  JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$PORT" \
  NUM_PROCESSES="$NUM_PROCESSES" \
  PROCESS_ID="$i" \
    "$PYTHON" -m "$MODULE" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f "$LOG_DIR/process_0.log" --pid "${pids[0]}" &

# Stop everyone as soon as one process fails: the others would wait for it until timeout.
for ((n = 0; n < NUM_PROCESSES; n++)); do
  if ! wait -n -p finished "${pids[@]}"; then
    echo "process with pid $finished failed; stopping the others (logs in $LOG_DIR)" >&2
    exit 1
  fi
done
