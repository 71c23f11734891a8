#!/usr/bin/env bash
# A scripted preemption on this machine: preemptd on the local provider, a
# sample trainer, and `preemptd simulate` standing in for the cloud's notice.
#   examples/demo.sh [PATH_TO_PREEMPTD]
set -euo pipefail
bin=$(realpath "${1:-bin/preemptd}")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/preemptd-demo.XXXXXX)
trap 'kill $daemon $trainer 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

export PREEMPTD_PROVIDER=local PREEMPTD_RUN_DIR=$work/run PREEMPTD_STATE_DIR=$work/state
export PREEMPTD_TRAINER_PID_FILE=$work/trainer.pid PREEMPTD_TRAINER_KILL_AFTER=20s
# Checkpoints: the trainer's folder, watched, committed to the local store
# (file://$work/state/store), Lightning-style single files.
export PREEMPTD_CHECKPOINT_DIR=$work/checkpoints PREEMPTD_CHECKPOINT_LAYOUT=lightning
export PREEMPTD_CHECKPOINT_QUIET_PERIOD=1s PREEMPTD_RUN_ID=demo

echo "== starting the sample trainer"
"$here/sample-trainer.sh" "$work/trainer.pid" "$work/run/notice.json" "$work/checkpoints" &
trainer=$!

echo "== starting preemptd (local provider, run dir $work/run)"
"$bin" run 2> "$work/preemptd.log" &
daemon=$!
for _ in $(seq 50); do [ -S "$work/run/preemptd.sock" ] && break; sleep 0.1; done
"$bin" status

sleep 1
echo
echo "== simulating a spot preemption: 30 s to the deadline"
"$bin" simulate --kind preempt --in 30s --wait
wait $trainer || true

echo
echo "== what preemptd logged (the checkpoint lines)"
grep -E 'checkpoint|emergency' "$work/preemptd.log" | cut -c1-220 || true
echo
echo "== checkpoints written by the trainer"
ls -l "$work/checkpoints"
echo
echo "== committed to the store (preemptd ls)"
"$bin" ls
echo
echo "== a new machine: preemptd restore into an empty folder, verified"
"$bin" restore --to "$work/restored"
ls -l "$work/restored"
last=$(ls "$work/checkpoints" | sort -t- -k2 -n | tail -1)
if cmp -s "$work/checkpoints/$last" "$work/restored/$last"; then
  echo "== restored $last is byte for byte the trainer's final checkpoint"
else
  echo "== restored checkpoint differs from the trainer's $last" >&2
  exit 1
fi
