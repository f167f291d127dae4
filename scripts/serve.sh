#!/usr/bin/env bash
# Sets up vllm-fastkv and serves a model with vLLM's OpenAI-compatible server, FASTKV backend.
#
#   bash scripts/serve.sh                    # CPU or GPU: a generated tiny model, offline
#   bash scripts/serve.sh MODEL [ARGS...]     # any model vLLM can load; ARGS go to `vllm serve`
#
# Listens on 127.0.0.1:${PORT:-8000}. FastKV knobs: VLLM_FASTKV_* variables or
# --additional-config '{"fastkv": {...}}' (see README.md, "Configuration").
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}

if [ ! -x "$venv/bin/vllm" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -e "$here"          # pulls vllm==0.26.0 (CUDA)
  else
    bash "$here/scripts/install-cpu.sh" "$venv" none
  fi
fi
export VLLM_HOST_IP=${VLLM_HOST_IP:-127.0.0.1}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}

if [ $# -ge 1 ]; then
  model=$1
  shift
else
  model=$here/.cache/tiny-llama
  [ -f "$model/config.json" ] || "$venv/bin/python" -m vllm_fastkv.tiny_model "$model" >/dev/null
  set -- --served-model-name tiny-llama --max-model-len 4096
fi
exec "$venv/bin/vllm" serve "$model" --attention-backend FASTKV \
  --host 127.0.0.1 --port "${PORT:-8000}" "$@"
