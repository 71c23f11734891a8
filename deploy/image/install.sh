#!/bin/sh
# Install preemptd on a running machine (or into an image root with --root):
# binary, systemd unit, logind drop-in, default config (kept if present),
# then enable (and start, on a running systemd) the unit. Idempotent.
#
#   install.sh --binary PATH [--config FILE] [--root DIR]
#   install.sh --deb PATH                     (dpkg -i, same result)
set -eu

usage() { echo "usage: $0 --binary PATH [--config FILE] [--root DIR] | --deb PATH" >&2; exit 2; }

binary="" config="" root="" deb=""
here=$(cd "$(dirname "$0")" && pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --deb) deb=$2; shift 2 ;;
    *) usage ;;
  esac
done

arch=${PREEMPTD_ARCH:-$(uname -m)}
case "$arch" in
  x86_64|amd64) arch=amd64 ;;
  aarch64|arm64) arch=arm64 ;;
  *) echo "install.sh: unsupported architecture '$arch': preemptd is built for amd64 and arm64 (the clouds' GPU machines)" >&2; exit 1 ;;
esac

if [ -n "$deb" ]; then
  dpkg -i "$deb"
  exit 0
fi
[ -n "$binary" ] || usage
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }

units=$here/../../systemd
[ -f "$units/preemptd.service" ] || units=/usr/share/preemptd/systemd

install -d "$root/usr/bin" "$root/etc/preemptd" "$root/etc/systemd/system" "$root/etc/systemd/logind.conf.d" "$root/var/lib/preemptd"
install -m 0755 "$binary" "$root/usr/bin/preemptd"
install -m 0644 "$units/preemptd.service" "$root/etc/systemd/system/preemptd.service"
install -m 0644 "$units/logind-preemptd.conf" "$root/etc/systemd/logind.conf.d/preemptd.conf"
if [ -n "$config" ]; then
  install -m 0600 "$config" "$root/etc/preemptd/preemptd.yaml"
elif [ ! -f "$root/etc/preemptd/preemptd.yaml" ]; then
  install -m 0600 "$here/../package/preemptd.yaml" "$root/etc/preemptd/preemptd.yaml"
fi
chmod 0750 "$root/var/lib/preemptd"

if [ -n "$root" ]; then
  if command -v systemctl >/dev/null 2>&1; then
    systemctl --root="$root" enable preemptd.service >/dev/null 2>&1 || true
  fi
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now preemptd.service
  systemctl restart systemd-logind.service || true
fi
echo "preemptd $("$root/usr/bin/preemptd" version 2>/dev/null | cut -d' ' -f2) installed${root:+ under $root}"
