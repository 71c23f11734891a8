#!/usr/bin/env bash
# Installs the pinned tools preemptd's tests and benchmarks run against,
# through the Go module proxy, into a cache outside the clone (reused by
# every clone and by CI):
#   ${PREEMPTD_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/preemptd/tools}/<tool>-<version>/<tool>
# Usage: scripts/tools.sh [test|bench]   (default test: AEMM, MinIO, nfpm, toxiproxy, helm, fake-gcs-server, versitygw, Azurite, python3-torch, Slurm and munge, the Python frameworks' venv); prints the cache path.
set -euo pipefail

AEMM_VERSION=v1.13.0
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
MC_VERSION=v0.0.0-20250313080218-cf909e1063a9
S5CMD_VERSION=v2.3.0
NFPM_VERSION=v2.45.2
TOXIPROXY_VERSION=v2.5.0
HELM_VERSION=v3.22.0
FAKE_GCS_VERSION=v1.56.1   # GCS emulator (JSON API)
AZURITE_VERSION=3.37.0     # Microsoft's Azure Storage emulator (npm; runs on node 20)
VERSITYGW_VERSION=v1.8.0   # a second S3 implementation (posix backend)
AWSCLI_VERSION=2.9.19-1
TORCH_VERSION=1.13.1+dfsg-4 # Debian's python3-torch (CPU), for the real torchrun trials
SLURM_VERSION=22.05.8-4+deb12u3 # Debian's slurmctld, slurmd and slurm-client, for the Slurm e2e test
MUNGE_VERSION=0.5.15-2+deb12u1  # Slurm's authentication daemon
FLIT_CORE_VERSION=3.10.1  # the Python helper's wheel build backend (PyPI), for offline builds

cache="${PREEMPTD_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/preemptd/tools}"
set_=${1:-test}

# install NAME VERSION PACKAGE: go install PACKAGE@VERSION into the cache.
install() {
  local name=$1 version=$2 pkg=$3
  local dir="$cache/$name-$version"
  [ -x "$dir/$name" ] && return 0
  echo "tools: installing $name $version through the Go module proxy (once; then cached in $dir)" >&2
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  GOBIN="$dir.tmp" GOFLAGS=-mod=mod go install "$pkg@$version" >&2
  local built
  built=$(basename "$pkg")
  [ "$built" = "$name" ] || mv "$dir.tmp/$built" "$dir.tmp/$name"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# install_npm NAME VERSION: npm install NAME@VERSION into the cache; the
# binary is linked as <tool>-<version>/<name>.
install_npm() {
  local name=$1 version=$2
  local dir="$cache/$name-$version"
  [ -x "$dir/$name" ] && return 0
  if ! command -v npm >/dev/null; then
    echo "tools: $name needs node (20 or later) and npm: apt-get install nodejs npm; its tests skip (fail under CI) until then" >&2
    return 0
  fi
  echo "tools: installing $name $version through npm (once; then cached in $dir)" >&2
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  npm install --silent --no-audit --no-fund --prefix "$dir.tmp" "$name@$version" >&2
  # npm writes absolute paths into nothing it installs here, so the folder moves.
  ln -s "node_modules/.bin/$name" "$dir.tmp/$name"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# s5cmd builds only from a module that requires it.
install_s5cmd() {
  local dir="$cache/s5cmd-$S5CMD_VERSION"
  [ -x "$dir/s5cmd" ] && return 0
  echo "tools: installing s5cmd $S5CMD_VERSION (once; cached in $dir)" >&2
  local mod
  mod=$(mktemp -d)
  printf 'module preemptd-tools/s5cmd\n\ngo 1.26\n\nrequire github.com/peak/s5cmd/v2 %s\n' "$S5CMD_VERSION" > "$mod/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/peak/s5cmd/v2"\n' > "$mod/tools.go"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  (cd "$mod" && GOFLAGS=-mod=mod go mod tidy >&2 && GOFLAGS=-mod=mod go build -o "$dir.tmp/s5cmd" github.com/peak/s5cmd/v2 >&2)
  rm -rf "$mod" "$dir" && mv "$dir.tmp" "$dir"
}

install ec2-metadata-mock "$AEMM_VERSION" github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock
install minio "$MINIO_VERSION" github.com/minio/minio # 5 to 13 minutes to build the first time on 2 cores (idle to loaded)
install nfpm "$NFPM_VERSION" github.com/goreleaser/nfpm/v2/cmd/nfpm
install toxiproxy-server "$TOXIPROXY_VERSION" github.com/Shopify/toxiproxy/v2/cmd/server
install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm # lints and renders deploy/helm/preemptd
install fake-gcs-server "$FAKE_GCS_VERSION" github.com/fsouza/fake-gcs-server
install versitygw "$VERSITYGW_VERSION" github.com/versity/versitygw/cmd/versitygw # about 7 minutes to build once
install_npm azurite "$AZURITE_VERSION"
# PyTorch from Debian, pinned, for /usr/bin/python3 (needs root; skipped with
# a line saying so otherwise, and the torch tests then say why they skip).
if ! dpkg-query -W -f='${Version}' python3-torch 2>/dev/null | grep -qx "$TORCH_VERSION"; then
  if [ "$(id -u)" = 0 ]; then
    echo "tools: installing python3-torch $TORCH_VERSION from Debian (once; about 4 minutes)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "python3-torch=$TORCH_VERSION"; } >&2
  else
    echo "tools: python3-torch $TORCH_VERSION not installed and not root: the torchrun tests will skip" >&2
  fi
fi
# flit_core from PyPI, pinned: the wheel of clients/python builds offline
# from this folder (scripts/wheel.sh).
flit_dir="$cache/flit_core-$FLIT_CORE_VERSION"
if ! ls "$flit_dir"/flit_core-"$FLIT_CORE_VERSION"-*.whl >/dev/null 2>&1; then
  echo "tools: downloading flit_core $FLIT_CORE_VERSION from PyPI (once; cached in $flit_dir)" >&2
  rm -rf "$flit_dir.tmp" && mkdir -p "$flit_dir.tmp"
  if python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$flit_dir.tmp" "flit_core==$FLIT_CORE_VERSION" >&2; then
    rm -rf "$flit_dir" && mv "$flit_dir.tmp" "$flit_dir"
  else
    echo "tools: flit_core $FLIT_CORE_VERSION could not be downloaded (python3 -m pip, PyPI): the wheel test will skip (fail under CI)" >&2
    rm -rf "$flit_dir.tmp"
  fi
fi
# The Python frameworks (torch 2.x, Lightning, Transformers, Accelerate, JAX
# and Orbax, DeepSpeed) from PyPI, every package pinned by
# test/frameworks/requirements*.txt, in a venv named by those files' hash:
# installed once (about 5 GB; the seconds it took are in install-seconds),
# then reused by every clone. PREEMPTD_FRAMEWORKS=0 skips it (the framework
# tests then skip, and fail under CI).
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "${PREEMPTD_FRAMEWORKS:-1}" != 0 ] && [ -f "$root/test/frameworks/requirements.txt" ]; then
  fw_key=$(cat "$root/test/frameworks/requirements.txt" "$root/test/frameworks/requirements-build.txt" | sha256sum | cut -c1-12)
  fw_dir="$cache/frameworks-$fw_key"
  if [ ! -f "$fw_dir/installed" ]; then
    echo "tools: installing the Python frameworks into $fw_dir from PyPI (once; about 5 GB)" >&2
    fw_start=$(date +%s)
    # A venv's scripts name its folder, so it is built in place; only a
    # finished install gets the "installed" mark (a broken one is redone).
    rm -rf "$fw_dir"
    if python3 -m venv "$fw_dir" >&2 &&
      "$fw_dir/bin/python" -m pip install --quiet --progress-bar off --no-deps -r "$root/test/frameworks/requirements.txt" >&2 &&
      DS_BUILD_OPS=0 "$fw_dir/bin/python" -m pip install --quiet --progress-bar off --no-deps --no-build-isolation \
        -r "$root/test/frameworks/requirements-build.txt" >&2; then
      echo $(($(date +%s) - fw_start)) > "$fw_dir/install-seconds"
      touch "$fw_dir/installed"
      echo "tools: the Python frameworks took $(cat "$fw_dir/install-seconds") s to install" >&2
    else
      echo "tools: the Python frameworks could not be installed (PyPI): the framework tests will skip (fail under CI)" >&2
      rm -rf "$fw_dir"
    fi
  fi
fi
# Slurm (one-node cluster started by the tests) and munge, from Debian, pinned.
if ! dpkg-query -W -f='${Version}' slurmd 2>/dev/null | grep -qx "$SLURM_VERSION" ||
  ! dpkg-query -W -f='${Version}' munge 2>/dev/null | grep -qx "$MUNGE_VERSION"; then
  if [ "$(id -u)" = 0 ]; then
    echo "tools: installing Slurm $SLURM_VERSION and munge $MUNGE_VERSION from Debian (once)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "slurmctld=$SLURM_VERSION" "slurmd=$SLURM_VERSION" "slurm-client=$SLURM_VERSION" "munge=$MUNGE_VERSION"; } >&2
  else
    echo "tools: Slurm $SLURM_VERSION not installed and not root: the Slurm test will skip" >&2
  fi
fi
if [ "$set_" = bench ]; then
  install mc "$MC_VERSION" github.com/minio/mc
  install_s5cmd
  # aws-cli from Debian, pinned.
  if ! dpkg-query -W -f='${Version}' awscli 2>/dev/null | grep -qx "$AWSCLI_VERSION"; then
    echo "tools: installing awscli $AWSCLI_VERSION from Debian (needs root)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "awscli=$AWSCLI_VERSION"; } >&2
  fi
fi
echo "$cache"
