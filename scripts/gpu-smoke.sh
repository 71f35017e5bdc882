#!/usr/bin/env bash
# What to run first on a new GPU node, and whenever a GPU machine is at hand: installs the GPU extra into .venv
# (made by scripts/setup.sh), then runs scripts/gpu_smoke.py on CUDA: a LoRA SFT step of the tiny model, the model
# and that adapter through the vLLM backend, and the checkpoint asset trained through `accelerate launch` (two
# processes on two GPUs or more). A few minutes; it stops at the first step that fails.
#   bash scripts/gpu-smoke.sh             # on the GPU node
#   bash scripts/gpu-smoke.sh --dry-run   # anywhere (CI): resolve the GPU install against PyPI, install nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

if [ "${1:-}" = --dry-run ]; then
  # A fresh environment's resolution (--ignore-installed) from PyPI alone (--isolated: no local indexes,
  # wheel folders or constraint files); the metadata of wheels, builds of sdists' metadata only.
  report=$(mktemp)
  trap 'rm -f "$report"' EXIT
  "${PIP[@]}" --isolated install --dry-run --ignore-installed --prefer-binary -q --report "$report" -e '.[gpu]'
  .venv/bin/python - "$report" <<'EOF'
import json
import sys

picked = {p["metadata"]["name"].lower(): p["metadata"]["version"] for p in json.load(open(sys.argv[1]))["install"]}
print("gpu-smoke: .[gpu] resolves from PyPI:",
      ", ".join(f"{name} {picked[name]}" for name in ("torch", "vllm", "transformers", "deepspeed", "accelerate")))
EOF
  exit 0
fi

command -v nvidia-smi >/dev/null || { echo "gpu-smoke: no nvidia-smi: not a GPU node (--dry-run checks the install)" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu-smoke: GPU /'
"${PIP[@]}" install -q -e '.[gpu]'
.venv/bin/python scripts/gpu_smoke.py
