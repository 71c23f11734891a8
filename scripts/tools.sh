#!/usr/bin/env bash
# Installs the pinned tools preemptd's tests run against, through the Go
# module proxy, into a cache outside the clone (reused by every clone and by
# CI): ${PREEMPTD_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/preemptd/tools}/<tool>-<version>/
set -euo pipefail

AEMM_VERSION=v1.13.0
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c

cache="${PREEMPTD_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/preemptd/tools}"

# install NAME VERSION PACKAGE: go install PACKAGE@VERSION into the cache.
install() {
  local name=$1 version=$2 pkg=$3
  local dir="$cache/$name-$version"
  if [ -x "$dir/$name" ]; then
    return 0
  fi
  echo "tools: installing $name $version (once; cached in $dir)" >&2
  mkdir -p "$dir.tmp"
  GOBIN="$dir.tmp" GOFLAGS=-mod=mod go install "$pkg@$version"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
}

install ec2-metadata-mock "$AEMM_VERSION" github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock
install minio "$MINIO_VERSION" github.com/minio/minio  # about 3 minutes to build the first time
echo "$cache"
