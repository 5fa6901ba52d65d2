#!/usr/bin/env bash
# Creates .venv and installs drivevla with every extra, pinned by requirements/constraints.txt.
# torch comes first: a machine with an NVIDIA driver takes PyPI's default (CUDA) build, any
# other machine the CPU build (a local wheel if pip's find-links has one, else PyTorch's CPU index).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or the constraints changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3.11 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=".venv/.drivevla-installed"
want=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

"${pip[@]}" install -q --upgrade pip wheel setuptools
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
        "${pip[@]}" install torch==2.13.0
    else
        echo "setup: no GPU, installing the CPU build of torch"
        probe=$(mktemp -d)
        # A CPU wheel in pip's find-links (as on our CI machines) outranks PyPI's CUDA build.
        if "${pip[@]}" download -q --no-deps --no-index -d "$probe" torch==2.13.0 >/dev/null 2>&1; then
            "${pip[@]}" install -q torch==2.13.0
        else
            "${pip[@]}" install -q torch==2.13.0 --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
                --extra-index-url https://pypi.org/simple
        fi
        rm -rf "$probe"
    fi
fi
echo "setup: installing drivevla and its dependencies (a few minutes on a fresh machine)"
"${pip[@]}" install -q -c requirements/constraints.txt -e ".[all,dev]"
echo "$want" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
