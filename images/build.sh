#!/usr/bin/env bash
# Builds the agent image (images/claude-runner) that every chat's container runs.
#
#   images/build.sh [--tag NAME:TAG] [--base IMAGE | --local-base] [--ca-bundle FILE]
#
# --base IMAGE     a Debian-based image with Node.js and npm (default node:22-bookworm-slim, pulled)
# --local-base     make that base here from Debian's packages (mmdebstrap + docker import), for machines
#                  that reach no container registry; chosen by itself when the default base cannot be pulled
# --ca-bundle FILE an extra CA bundle the build and the CLI must trust (TLS interception)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tag=claude-runner:latest
base=node:22-bookworm-slim
base_given=no
local_base=no
ca_bundle=${EXTRA_CA_BUNDLE:-}
local_base_tag=orchestrator-debian-node:bookworm

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; base_given=yes; shift 2 ;;
    --local-base) local_base=yes; shift ;;
    --ca-bundle) ca_bundle=$2; shift 2 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

make_local_base() {
  if docker image inspect "$local_base_tag" >/dev/null 2>&1; then
    echo "build.sh: reusing local base $local_base_tag"
    return
  fi
  command -v mmdebstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
  }
  local rootfs
  rootfs=$(mktemp -d)/rootfs.tar
  echo "build.sh: making $local_base_tag with mmdebstrap (about a minute)"
  mmdebstrap --quiet --variant=minbase \
    --include=nodejs,npm,ca-certificates,git,tini,procps,less,curl bookworm "$rootfs"
  docker import "$rootfs" "$local_base_tag" >/dev/null
  rm -rf "$(dirname "$rootfs")"
}

if [ "$local_base" = yes ]; then
  make_local_base
  base=$local_base_tag
elif ! docker image inspect "$base" >/dev/null 2>&1 && ! timeout 60 docker pull "$base" >/dev/null 2>&1; then
  if [ "$base_given" = yes ]; then
    echo "build.sh: cannot find or pull the base image $base" >&2
    exit 1
  fi
  echo "build.sh: $base cannot be pulled here; making a local Debian base instead"
  make_local_base
  base=$local_base_tag
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$here/claude-runner/Dockerfile" "$here/claude-runner/run-turn" "$context/"
if [ -n "$ca_bundle" ]; then cp "$ca_bundle" "$context/extra-ca.crt"; else : > "$context/extra-ca.crt"; fi

echo "build.sh: building $tag from $base"
docker build --quiet --build-arg "BASE_IMAGE=$base" -t "$tag" "$context"
echo "build.sh: built $tag"
