#!/usr/bin/env bash
# The whole GPU-machine job in one go, after the vLLM bundle is installed into /tmp/site
# (see benchmarks/README.md). Writes everything under ${RESULTS:-/tmp/fastkv-results}.
#   STAGES="tests kernels bench accuracy" TESTS="tests/kernels tests/e2e" bash benchmarks/gpu_session.sh
# (PYTEST_K, KERNEL_ARGS, BENCH_ARGS, HARNESS_ARGS: extra arguments of each stage.)
set -uo pipefail
cd "$(dirname "$0")/.."
res=${RESULTS:-/tmp/fastkv-results}
mkdir -p "$res"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} VLLM_HOST_IP=127.0.0.1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export GIT_COMMIT=${GIT_COMMIT:-$(cat .git-commit 2>/dev/null || echo unknown)}
stages=${STAGES:-tests kernels bench}

# This package into the same site dir, so vLLM finds its plugin entry point.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
fi
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$res/device.txt"

for stage in $stages; do
  echo "=== stage $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests)
      python3 -m pytest ${TESTS:-tests/kernels tests/e2e} ${PYTEST_K:+-k "$PYTEST_K"} -q -p no:cacheprovider \
        --junitxml="$res/pytest-gpu.xml" 2>&1 | tee "$res/pytest-gpu.log" | tail -40
      ;;
    kernels)
      [ -f benchmarks/bench_kernels.py ] || { echo "no kernel benchmark"; continue; }
      python3 benchmarks/bench_kernels.py --out "$res/kernels.json" ${KERNEL_ARGS:-} 2>&1 \
        | tail -60 | tee "$res/kernels.log"
      ;;
    bench)
      python3 benchmarks/serve_bench.py --out "$res/serve_bench.json" ${BENCH_ARGS:-} 2>&1 \
        | tee "$res/serve_bench.log" | grep -v "^{" ;;
    accuracy)
      # The trained retriever by default; HARNESS_ARGS picks methods, rates, lengths.
      python3 -m benchmarks.accuracy.harness --out "$res/accuracy.json" \
        ${HARNESS_ARGS:---retriever --model-dir /tmp/fastkv-retriever --dtype bfloat16 --enforce-eager} \
        2>&1 | tee "$res/harness.log" | tail -30 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
touch "$res/DONE"
