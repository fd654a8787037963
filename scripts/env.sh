# Sourced by scripts/bench.sh and scripts/test.sh: a virtual environment with torch and the project, from nothing but
# Python >= 3.10. The CPU torch wheel unless the machine has an NVIDIA GPU (a bare `torch` then pulls the CUDA build).
# RAPIDDIFF_VENV: where the environment lives (default .venv in the repository); EXTRAS: the project's extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RAPIDDIFF_VENV:-$ROOT/.venv}"
TORCH_CPU_VERSION="2.13.0"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install -q torch
    else
        python -m pip install -q "torch==$TORCH_CPU_VERSION"
    fi
fi
python -m pip install -q -e "$ROOT[${EXTRAS:-test}]"
cd "$ROOT"
