#!/usr/bin/env bash
# Make this machine able to build the images: a Docker engine and the base image they start from.
# Idempotent; for CI and for a fresh machine (root). Where nothing can be done it says why, exit 1.
#   - Debian's docker.io (the engine) and debootstrap, with apt, when missing;
#   - dockerd started in the background when no engine answers;
#   - python:3.11-slim: when it cannot be pulled, built from Debian bookworm with debootstrap
#     (python3, venv, pip: the same Python 3.11 the official slim image carries) and imported;
#     the tarball is cached in $GPTCPU_DOCKER_CACHE (default /var/cache/gptcpu-docker).
set -euo pipefail
cache=${GPTCPU_DOCKER_CACHE:-/var/cache/gptcpu-docker}
base=${BASE_IMAGE:-python:3.11-slim}

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "docker.io and debootstrap are missing and this is not root" >&2; exit 1; }
  apt-get update -q >/dev/null || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  (dockerd >/tmp/gptcpu-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /tmp/gptcpu-dockerd.log" >&2; exit 1; }
fi
if ! docker image inspect "$base" >/dev/null 2>&1 && ! docker pull -q "$base" >/dev/null 2>&1; then
  tarball="$cache/bookworm-python3.tar"
  if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    rm -rf "$cache/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$cache/rootfs" >/dev/null
    tar -C "$cache/rootfs" -c . >"$tarball.tmp" && mv "$tarball.tmp" "$tarball"
    rm -rf "$cache/rootfs"
  fi
  docker import "$tarball" "$base" >/dev/null
fi
echo "docker engine up; base image $base present"
