#!/usr/bin/env bash
# preemptd on a real GPU: a PyTorch training loop holds the GPU, `preemptd gpu`
# finds it, a simulated notice with trainer.gpu_processes signals it through
# NVML's process list, and the emergency path waits until the GPU is released.
#   test/gpu/check.sh [PREEMPTD_BINARY]     (writes its report to $OUT or ./gpu-check)
set -u
bin=$(realpath "${1:-bin/preemptd}")
out=${OUT:-$PWD/gpu-check}
mkdir -p "$out"
work=$(mktemp -d /tmp/pdgpu.XXXXXX)
pass=0 fail=0
check() { if eval "$2"; then echo "PASS: $1"; pass=$((pass+1)); else echo "FAIL: $1"; fail=$((fail+1)); fi; }

if ! "$bin" version; then
  echo "the carried binary does not run here; building with the local Go"
  CGO_ENABLED=1 CGO_CFLAGS=-Wno-deprecated-declarations go build -o "$work/preemptd" ./cmd/preemptd && bin=$work/preemptd
fi
echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
ldd "$bin" | grep -E 'libc|not a dynamic' || true

echo "== trainer"
python3 test/gpu/train.py "$work/model.pt" > "$work/trainer.log" 2>&1 &
trainer=$!
for _ in $(seq ${GPU_WAIT_TRIES:-120}); do
  "$bin" gpu --json > "$work/gpu-before.json" 2>/dev/null
  grep -q "\"pid\": $trainer" "$work/gpu-before.json" && grep -q "training on" "$work/trainer.log" && break
  sleep 0.5
done
sleep 3 # let it train a while before the notice
cat "$work/trainer.log"
echo "== preemptd gpu --json (trainer running)"; cat "$work/gpu-before.json"
echo "== preemptd gpu"; "$bin" gpu
check "preemptd gpu finds the trainer (pid $trainer) on the GPU" "grep -q '\"pid\": $trainer' '$work/gpu-before.json'"

cat > "$work/preemptd.yaml" <<YAML
provider: local
run_dir: $work/run
state_dir: $work/state
trainer: {gpu_processes: true, wait_gpu_release: true, kill_after: 50s}
YAML
"$bin" run --config "$work/preemptd.yaml" 2> "$work/preemptd.log" &
daemon=$!
for _ in $(seq 50); do [ -S "$work/run/preemptd.sock" ] && break; sleep 0.1; done

echo "== preemptd simulate --kind preempt --in 60s --wait"
start=$(date +%s%N)
"$bin" simulate --config "$work/preemptd.yaml" --kind preempt --in 60s --wait
end=$(date +%s%N)
"$bin" status --config "$work/preemptd.yaml" --json > "$work/status.json"
wait $trainer; trainer_rc=$?
"$bin" gpu --json > "$work/gpu-after.json"
echo "== trainer log"; cat "$work/trainer.log"
echo "== preemptd log"; cat "$work/preemptd.log"
echo "== preemptd gpu --json (after)"; cat "$work/gpu-after.json"
echo "== simulate --wait took $(( (end - start) / 1000000 )) ms"

check "the trainer got SIGTERM" "grep -q 'got signal 15' '$work/trainer.log'"
check "the trainer saved its checkpoint and exited 0" "[ $trainer_rc -eq 0 ] && grep -q 'saved checkpoint' '$work/trainer.log'"
check "the signal was found through gpu_processes" "grep -q '\"gpu_processes\"' '$work/status.json'"
check "the gpu-release step completed without error" "python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); st=[x for x in s[\"emergency\"][\"steps\"] if x[\"name\"]==\"gpu-release\"]; sys.exit(0 if st and not st[0].get(\"error\") else 1)' '$work/status.json'"
check "no process holds the GPU afterwards" "! grep -q '\"pid\": $trainer' '$work/gpu-after.json'"
check "notice.json carried the GPU snapshot" "grep -q '\"available\": true' '$work/run/notice.json'"

kill -INT $daemon 2>/dev/null; wait $daemon 2>/dev/null
cp "$work"/*.json "$work"/*.log "$out"/ 2>/dev/null; cp "$work/run/notice.json" "$out/notice.json" 2>/dev/null
echo "== $pass passed, $fail failed"
rm -rf "$work"
[ $fail -eq 0 ]
