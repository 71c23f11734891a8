#!/bin/sh
# Stop and disable preemptd when the package is removed (not on upgrade).
set -e
case "${1:-}" in
  remove|purge|0)
    if [ -d /run/systemd/system ]; then
      systemctl stop preemptd.service >/dev/null 2>&1 || true
    fi
    if command -v systemctl >/dev/null 2>&1; then
      systemctl disable preemptd.service >/dev/null 2>&1 || true
    fi
    ;;
esac
exit 0
