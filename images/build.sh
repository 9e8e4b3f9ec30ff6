#!/usr/bin/env bash
# Builds the agent image (images/claude-runner) that every chat's container runs, or with --orchestrator
# the orchestrator's own image (images/orchestrator, built from the repository root), or with --swarm-node the
# image of the Docker-in-Docker nodes and the local registry that the Swarm tests run (images/swarm-node); with
# --push REGISTRY, the image built is then pushed to that registry (as REGISTRY/NAME:TAG) for Swarm nodes to pull.
#
#   images/build.sh [--orchestrator | --swarm-node] [--tag NAME:TAG] [--base IMAGE | --local-base]
#                   [--ca-bundle FILE] [--push REGISTRY]
#
# --orchestrator   build the orchestrator's image (default tag orchestrator:latest) instead of the agent's
#                  (claude-runner:latest)
# --swarm-node     build the test nodes' image (default tag orchestrator-swarm-node:latest)
# --push REGISTRY  push the built image to REGISTRY (host[:port]) as REGISTRY/NAME:TAG; agent.image (the agent's)
#                  or swarm.orchestrator_image (--orchestrator's) must then name it so for runtime: swarm
# --base IMAGE     the base, pulled if missing: Debian-based with Node.js and npm for the agent (default
#                  node:22-bookworm-slim), with Python 3.11 for the orchestrator (default python:3.11-slim)
# --local-base     make that base here from Debian bookworm's packages (mmdebstrap + docker import), for
#                  machines that reach no container registry; chosen by itself when the default cannot be pulled
# --ca-bundle FILE an extra CA bundle the build and the image must trust (TLS interception)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
what=agent
tag=
base=
local_base=no
push=
ca_bundle=${EXTRA_CA_BUNDLE:-}

while [ $# -gt 0 ]; do
  case "$1" in
    --orchestrator) what=orchestrator; shift ;;
    --swarm-node) what=swarm-node; shift ;;
    --push) push=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --local-base) local_base=yes; shift ;;
    --ca-bundle) ca_bundle=$2; shift 2 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

# What differs between the two images; everything below is shared.
case "$what" in
  agent)
    default_tag=claude-runner:latest
    default_base=node:22-bookworm-slim
    local_base_tag=orchestrator-debian-node:bookworm
    local_base_packages=nodejs,npm,ca-certificates,git,tini,procps,less,curl,socat,python3-minimal ;;
  orchestrator)
    default_tag=orchestrator:latest
    default_base=python:3.11-slim
    local_base_tag=orchestrator-debian-python:bookworm
    local_base_packages=python3,python3-venv,ca-certificates,tini,iptables ;;
  swarm-node)
    default_tag=orchestrator-swarm-node:latest
    default_base=debian:bookworm-slim
    # the orchestrator's local base: one mmdebstrap serves both
    local_base_tag=orchestrator-debian-python:bookworm
    local_base_packages=python3,python3-venv,ca-certificates,tini,iptables ;;
esac
tag=${tag:-$default_tag}
base_given=yes
[ -n "$base" ] || { base=$default_base; base_given=no; }

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
  mmdebstrap --quiet --variant=minbase --include="$local_base_packages" bookworm "$rootfs"
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

# Build contexts made here (the agent's, the extra-CA layer's) live in temporary folders.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# DIR/extra-ca.crt: the CA bundle, or an empty file when there is none.
stage_ca() {
  if [ -n "$ca_bundle" ]; then cp "$ca_bundle" "$1/extra-ca.crt"; else : > "$1/extra-ca.crt"; fi
}

build() {  # build TAG BASE [docker build options] CONTEXT
  local image=$1 from=$2
  shift 2
  echo "build.sh: building $image from $from"
  docker build --quiet --build-arg "BASE_IMAGE=$from" -t "$image" "$@"
}

case "$what" in
  agent)
    mkdir "$scratch/agent"
    cp "$here/claude-runner/Dockerfile" "$here/claude-runner/agent-init" "$here/claude-runner/send-file" \
      "$repo/orchestrator/agent_host.py" "$scratch/agent/"
    stage_ca "$scratch/agent"
    build "$tag" "$base" "$scratch/agent" ;;
  orchestrator)
    # The context is the repository itself (.dockerignore keeps it to the package), so the CA goes into
    # the base: a layer on top of it that adds the bundle to the system store.
    if [ -n "$ca_bundle" ]; then
      mkdir "$scratch/extra-ca"
      cp "$here/extra-ca/Dockerfile" "$scratch/extra-ca/"
      stage_ca "$scratch/extra-ca"
      build orchestrator-base:extra-ca "$base" "$scratch/extra-ca"
      base=orchestrator-base:extra-ca
    fi
    build "$tag" "$base" -f "$here/orchestrator/Dockerfile" "$repo" ;;
  swarm-node)
    mkdir "$scratch/node"
    cp "$here/swarm-node/Dockerfile" "$scratch/node/"
    stage_ca "$scratch/node"
    build "$tag" "$base" "$scratch/node" ;;
esac
echo "build.sh: built $tag"
if [ -n "$push" ]; then
  # NAME:TAG without any registry part it had, under REGISTRY
  name=${tag##*/}
  docker tag "$tag" "$push/$name"
  echo "build.sh: pushing $push/$name"
  docker push "$push/$name"
fi
