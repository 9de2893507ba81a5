#!/usr/bin/env bash
# The base image of local builds, made without an image registry: a minimal Debian 12 (bookworm) root
# filesystem from debootstrap, taken from the mirror this machine's apt uses, imported into podman.
# It holds what the Dockerfile expects of `python:3.11-slim`: python3 with venv, CA certificates, and the
# OpenMP runtime LightGBM's wheel links against (libgomp1).
#
#   deploy/podman/base-image.sh IMAGE WORKDIR     (run by `make base-image`; needs root, podman, debootstrap)
#
# Idempotent: nothing is done when IMAGE exists. The root filesystem is built in WORKDIR and removed once
# imported.
set -euo pipefail

image=$1
workdir=$2
here=$(dirname "$0")

if podman image exists "$image"; then
    echo "base image $image: present"
    exit 0
fi
mirror=$(python3 "$here/debian_mirror.py" bookworm)
rootfs="$workdir/rootfs"
rm -rf "$rootfs"
mkdir -p "$workdir"
echo "debootstrap bookworm (minbase) from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
    bookworm "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 \
    || { tail -n 30 "$workdir/debootstrap.log"; exit 1; }
# No package lists or caches in the image: apt is not used after this.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image"
rm -rf "$rootfs"
echo "base image $image: imported ($(podman run --rm "$image" python3 --version))"
