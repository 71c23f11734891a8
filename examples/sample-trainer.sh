#!/usr/bin/env bash
# A stand-in training loop that behaves as a well-mannered trainer under
# preemptd: it writes its PID, trains, and on SIGTERM reads the deadline from
# notice.json, saves a checkpoint and exits.
#   sample-trainer.sh PIDFILE NOTICE_JSON CHECKPOINT_DIR
set -euo pipefail
pidfile=$1 notice=$2 ckpt=$3
mkdir -p "$ckpt"
echo $$ > "$pidfile"

on_term() {
  echo "trainer: SIGTERM received at step $step"
  if [ -f "$notice" ]; then
    echo "trainer: notice.json says:"
    sed 's/^/    /' "$notice"
  fi
  printf 'step=%s\n' "$step" > "$ckpt/step-$step.tmp"
  mv "$ckpt/step-$step.tmp" "$ckpt/step-$step.ckpt"
  echo "trainer: checkpoint $ckpt/step-$step.ckpt saved; exiting"
  exit 0
}
trap on_term TERM

step=0
echo "trainer: pid $$, training"
while true; do
  step=$((step + 1))
  sleep 0.1 &
  wait $!
done
