#!/usr/bin/env bash
# Waits up to ${1:-540} s for a detached gpu_session.sh to finish, then copies its
# results to $OUT (the device tool returns at most 8 files).
res=${RESULTS:-/tmp/fastkv-results}
deadline=$(( $(date +%s) + ${1:-540} ))
while [ ! -f "$res/DONE" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
[ -f "$res/DONE" ] && echo "session finished" || echo "session still running"
tail -c 6000 "$res/session.log" 2>/dev/null
mkdir -p "$OUT"
for f in session.log pytest-gpu.log kernels.json kernels.log serve_bench.json accuracy.json harness.log device.txt; do
  [ -f "$res/$f" ] && cp "$res/$f" "$OUT/"
done
ls -la "$OUT"
