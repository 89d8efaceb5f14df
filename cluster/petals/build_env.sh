#!/usr/bin/env bash
# Build the Petals client/server environment: its own virtualenv, because Petals 2.2.0.post1 pins libraries
# (transformers 4.3x, pydantic, hivemind) that cannot live next to distattr's transformers 5. It goes to the
# distattr cache folder ($DISTATTR_CACHE, default ~/.cache/distattr), where distattr.models.petals looks for it
# (so every clone and CI run on a machine shares it). Idempotent: a finished environment (marker) is left alone.
# Needs PyPI (~1.6 GB, ~2 minutes).
#
# Usage: bash cluster/petals/build_env.sh [VENV_DIR]
set -euo pipefail
venv="${1:-${DISTATTR_CACHE:-$HOME/.cache/distattr}/petals-env-v1}"
marker="$venv/.distattr-petals-env-v1"
[ -f "$marker" ] && exit 0
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
# torch first, pinned to the CPU wheel (any other version would pull a CUDA build)
$pip install -qq torch==2.13.0
# hivemind 1.1.12 is the only Linux wheel with the p2pd daemon bundled (older sdists download it at build time);
# the rest are Petals 2.2.0.post1's requirements at versions that work with it
$pip install -qq hivemind==1.1.12 "transformers==4.34.1" "tokenizers>=0.14,<0.15" "huggingface-hub>=0.16.4,<0.18" \
  "accelerate==0.24.1" "numpy<2" "safetensors>=0.3.1" "peft==0.5.0" "bitsandbytes==0.41.1" \
  "tensor_parallel==1.0.23" "speedtest-cli==2.1.3" humanfriendly "async-timeout>=4.0.2" sentencepiece \
  "Dijkstar>=2.6.0" "cpufeature>=0.2.0" "pydantic>=2" psutil
# Petals without its pins (hivemind==1.1.10.post2, pydantic<2): see distattr/models/petals_worker.py
$pip install -qq --no-deps petals==2.2.0.post1
"$venv/bin/python" -c "import torch, hivemind, transformers; assert transformers.__version__ == '4.34.1'"
touch "$marker"
