#!/usr/bin/env bash
# Create .venv and install the project. On a machine without a GPU the CPU build of torch is
# installed first, so nothing pulls a multi-GB CUDA build: torch==2.13.0 (on machines that keep the
# CPU wheel locally), or from PyTorch's CPU index when SAND_TORCH_INDEX names it, e.g.
#   SAND_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# A GPU user sets SAND_TORCH to the CUDA torch they want, then `pip install -e .[gpu]` adds vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

command -v java >/dev/null || { echo "setup: ScienceWorld needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "${SAND_TORCH:-torch==2.13.0}" ${SAND_TORCH_INDEX:+--index-url "$SAND_TORCH_INDEX"}
fi
"${PIP[@]}" install -e ".[dev]"
echo "setup: done ($(.venv/bin/python -c 'import torch, transformers, dagster; print("torch", torch.__version__, "transformers", transformers.__version__, "dagster", dagster.__version__)'))"
