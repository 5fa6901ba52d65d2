#!/usr/bin/env bash
# The seed's scripts/run_carla_online_rl.sh on drivevla: start CARLA in Docker, train online against
# it, stop it. Differences from the seed, on purpose:
# - `drivevla carla up` finds free ports (CARLA_PORT is only where the search starts), waits until the
#   server answers get_server_version() instead of `sleep 30`, and removes the container if it never does;
# - the server is removed on every exit (success, failure, Ctrl-C) by the trap, and only this run's:
#   other servers on the machine are left alone;
# - training is the online stage (`python -m stages.online`), reading the endpoints that `up` exports.
#
# Usage: scripts/run_carla_online_rl.sh [extra `python -m stages.online` arguments, e.g. --set online.algo=ppo]
# Environment: CARLA_VERSION, CARLA_PORT, CARLA_GPUS (e.g. 0 or 0,1; empty: no GPU), CARLA_SERVERS
# (default: what the stage needs, one per env: num_envs + 1 for evaluation, from `carla servers-needed`),
# TOTAL_TIMESTEPS, OUTPUT_DIR, CARLA_UP_ARGS (more `carla up` options, e.g. "--set quality_level=Epic").
# Inside a Prefect flow the same happens through tasks/carla_resource.py (`drivevla pipeline --preset carla`).
set -euo pipefail
cd "$(dirname "$0")/.."

CARLA_VERSION=${CARLA_VERSION:-0.9.16}   # keep equal to the pip client (carla==0.9.16)
CARLA_PORT=${CARLA_PORT:-2000}
CARLA_GPUS=${CARLA_GPUS-0}     # set but empty: no GPU request
TOTAL_TIMESTEPS=${TOTAL_TIMESTEPS:-1000000}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/online}
PYTHON=${PYTHON:-.venv/bin/python}

# `drivevla carla ...` once the sub-command is mounted; the module itself otherwise (same commands).
if [ -x .venv/bin/drivevla ] && .venv/bin/drivevla carla --help >/dev/null 2>&1; then
    carla=(.venv/bin/drivevla carla)
else
    carla=("$PYTHON" -m flows.carla_cli)
fi

if [ -z "${CARLA_SERVERS:-}" ]; then
    # One server per env slot of the stage run below (same preset and --set arguments).
    if ! CARLA_SERVERS=$("${carla[@]}" servers-needed --preset carla --set env.backend=carla "$@"); then
        echo "Could not work out how many CARLA servers the online stage needs (see above)" >&2
        exit 2
    fi
fi

echo "Starting ${CARLA_SERVERS} CARLA ${CARLA_VERSION} server(s) on GPU(s) ${CARLA_GPUS}..."
env_file=$(mktemp)
if ! "${carla[@]}" up --tag "$CARLA_VERSION" --port "$CARLA_PORT" --gpus "$CARLA_GPUS" \
        --servers "$CARLA_SERVERS" ${CARLA_UP_ARGS:-} --format env >"$env_file"; then
    rm -f "$env_file"
    echo "Failed to start CARLA (its logs are above; nothing is left running)" >&2
    exit 1
fi
# shellcheck disable=SC1090
. "$env_file"
rm -f "$env_file"

cleanup() {
    echo "Stopping CARLA server(s)..."
    "${carla[@]}" down --session "$DRIVEVLA_CARLA_SESSION" || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
echo "Connected to CARLA on ${CARLA_HOST}:${CARLA_PORT} (session ${DRIVEVLA_CARLA_SESSION})"

echo "Starting training..."
"$PYTHON" -m stages.online --preset carla \
    --set env.backend=carla \
    --set online.total_timesteps="$TOTAL_TIMESTEPS" \
    --set online.out="$OUTPUT_DIR" \
    "$@"

echo "Training complete!"
