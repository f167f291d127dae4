# syntax=docker/dockerfile:1
# vLLM's OpenAI-compatible server with the vllm-fastkv plugin (FASTKV attention backend).
#
#   docker build -t vllm-fastkv:0.1.0 .
#   docker run --gpus all -p 8000:8000 --ipc=host \
#       -e MODEL=meta-llama/Llama-3.1-8B-Instruct -e HF_TOKEN \
#       -e VLLM_FASTKV_TSP_RATE=0.2 -e VLLM_FASTKV_RETAIN_RATE=0.1 \
#       -e VLLM_ARGS="--max-model-len 32768" vllm-fastkv:0.1.0
#
# Configuration is runtime environment only (see deploy/docker-entrypoint.sh); no token or other
# secret is an ARG or ENV here, so none can end up in an image layer.

# vLLM's own image for the version the plugin pins: CUDA, torch and vLLM built by vLLM's CI.
FROM vllm/vllm-openai:v0.26.0

LABEL org.opencontainers.image.title="vllm-fastkv" \
      org.opencontainers.image.description="vLLM OpenAI server with the FastKV attention backend" \
      org.opencontainers.image.licenses="Apache-2.0"

# --no-deps: the base image already holds vllm==0.26.0 and its CUDA torch, and pip must not
# swap them for other builds; check_install.py then fails the build if those pins are not met
# or vLLM would not find the plugin's entry point.
COPY setup.py README.md requirements-test.txt /tmp/vllm-fastkv/
COPY vllm_fastkv /tmp/vllm-fastkv/vllm_fastkv
COPY deploy/check_install.py /tmp/vllm-fastkv/
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/vllm-fastkv \
    && python3 /tmp/vllm-fastkv/check_install.py \
    && rm -rf /tmp/vllm-fastkv

# A fixed numeric UID lets Kubernetes verify runAsNonRoot; it lies outside the range that
# distribution images give their own users (Ubuntu 24.04 images already own UID 1000).
RUN groupadd --gid 10001 vllm \
    && useradd --no-log-init --uid 10001 --gid vllm --create-home --home-dir /home/vllm \
       --shell /usr/sbin/nologin vllm

COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# vLLM, Triton and huggingface_hub keep their caches under HOME; mount a volume on HF_HOME to
# keep downloaded weights across restarts.
ENV HOME=/home/vllm \
    HF_HOME=/home/vllm/.cache/huggingface \
    PORT=8000
USER 10001:10001
WORKDIR /home/vllm
EXPOSE 8000

# /health answers 200 once the engine is up; loading a large model can take many minutes.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${PORT}/health\" || exit 1"]

ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
