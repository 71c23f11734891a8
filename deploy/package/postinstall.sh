#!/bin/sh
# Enable preemptd at boot; start it now on a running systemd. Offline (an
# image being built, DPKG_ROOT set, or no systemd running) only enable it.
set -e
if [ -n "${DPKG_ROOT:-}" ]; then
  systemctl --root="$DPKG_ROOT" enable preemptd.service >/dev/null 2>&1 || true
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
  systemctl enable preemptd.service >/dev/null 2>&1 || true
  systemctl restart preemptd.service >/dev/null 2>&1 || true
elif command -v systemctl >/dev/null 2>&1; then
  systemctl enable preemptd.service >/dev/null 2>&1 || true
fi
exit 0
