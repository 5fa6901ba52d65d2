#!/usr/bin/env bash
# Sets everything up and runs the test suite. Extra arguments go to pytest.
# Where a Docker engine can be started (root + apt), it is, for the tests of the CARLA server manager.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
if [ -f scripts/docker-engine.sh ]; then bash scripts/docker-engine.sh || echo "test: no Docker engine; docker tests will be skipped"; fi
export SDL_VIDEODRIVER=dummy
exec .venv/bin/python -m pytest "$@"
