#!/usr/bin/env bash
# Container entrypoint: vLLM's OpenAI server with the FASTKV attention backend, configured
# from the environment so that `docker run -e ...`, Compose and Kubernetes all drive it alike.
#
#   MODEL                 (required) Hugging Face model id or a path inside the container
#   PORT                  listen port (default 8000); the server binds 0.0.0.0
#   VLLM_ARGS             extra `vllm serve` arguments, split on whitespace (`docker run -e`)
#   arguments             appended verbatim after VLLM_ARGS (Kubernetes `args:` keep quoting,
#                         e.g. JSON for --additional-config); a first argument that is not an
#                         option runs that command instead (`docker run IMAGE vllm --version`)
#   VLLM_FASTKV_<FIELD>   FastKV knobs, read by the plugin itself; empty = the field's default
#   HF_TOKEN              gated models; read by huggingface_hub, supplied at run time only
#   PROMETHEUS_MULTIPROC_DIR  default: a fresh temporary directory (see below)
set -euo pipefail

if [[ $# -gt 0 && $1 != -* ]]; then
  exec "$@"
fi

if [[ -z ${MODEL:-} ]]; then
  echo "docker-entrypoint: set MODEL to a Hugging Face model id or a local model path" >&2
  exit 64
fi

# The plugin parses VLLM_FASTKV_* values and rejects an empty string, but orchestrators find it
# easiest to template every knob (VLLM_FASTKV_TSP_LAYER= meaning "the middle layer"), so an
# empty knob is dropped and the plugin's default applies.
for name in $(compgen -e); do
  if [[ $name == VLLM_FASTKV_* && -z ${!name} ]]; then
    unset "$name"
  fi
done

# FastKV's retention metrics are counted in the engine process; Prometheus' multiprocess
# mode (a fresh directory per container start) brings them to vLLM's /metrics.
if [[ -z ${PROMETHEUS_MULTIPROC_DIR:-} ]]; then
  PROMETHEUS_MULTIPROC_DIR=$(mktemp -d -t vllm-metrics.XXXXXX)
  export PROMETHEUS_MULTIPROC_DIR
fi

# Split VLLM_ARGS into words without glob expansion (an unquoted $VLLM_ARGS would glob).
read -r -a vllm_args <<<"${VLLM_ARGS:-}"

exec vllm serve "$MODEL" --attention-backend FASTKV \
  --host 0.0.0.0 --port "${PORT:-8000}" "${vllm_args[@]}" "$@"
