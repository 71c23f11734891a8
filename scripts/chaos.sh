#!/usr/bin/env bash
# `make chaos`: the fault suite in full (test/chaos and the fault tests of
# test/e2e), then a summary table of the faults injected and their outcomes.
# With --short, the short form that `make test` also runs.
set -uo pipefail
short=""
[ "${1:-}" = --short ] && short=-short
# In full, the randomized protocol trials also run a few hundred times
# against MinIO (a few in `make test`).
[ -z "$short" ] && export PREEMPTD_CHAOS_FULL=1
log=$(mktemp)
PREEMPTD_TOOLS=${PREEMPTD_TOOLS:-$(scripts/tools.sh)} go test $short -count=1 -v -timeout 30m \
  -run 'Chaos|Randomized|Faults|Connection|Bandwidth|SlowDown|DiskFull|MidSave|MidUpload|Escalation|Integrity|SlowLink|Outage|Corrupted|Transient|DoctorCloud' \
  ./test/chaos ./test/e2e ./checkpoint/storage > "$log" 2>&1
rc=$?
grep -E -- '^(--- |ok|FAIL)' "$log"
echo
echo "FAULT INJECTED|OUTCOME|VERDICT" > "$log.table"
grep -o 'CHAOS|.*' "$log" | cut -d'|' -f2- | sort >> "$log.table"
column -t -s '|' "$log.table"
[ $rc -eq 0 ] || { echo; echo "chaos: some tests failed; the full log is $log"; exit $rc; }
rm -f "$log" "$log.table"
