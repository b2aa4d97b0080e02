#!/usr/bin/env bash
# Prepares this machine to build and run the project's Dockerfile with podman when no image
# registry can be reached (our CI machines: Debian's apt mirror and PyPI only, no Docker
# engine). Run as root; deploy/ci-setup.sh calls it. Idempotent: once the image exists a
# rerun only checks that a container starts.
#
# What it leaves behind:
#   localhost/debian-base:bookworm  a minimal Debian built with debootstrap from the apt mirror
#                                   (bookworm's python3 is 3.11, which the Dockerfile needs)
#   /usr/local/bin/podman-local     podman with the settings these machines need (see below)
# and so the image builds and runs with
#   podman-local build --network host --build-arg BASE_IMAGE=localhost/debian-base:bookworm .
#   podman-local run --rm --network host <image>
# tests/deploy/test_container.py does exactly that.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

BASE_IMAGE=localhost/debian-base:bookworm
SUITE=bookworm
WRAPPER=/usr/local/bin/podman-local
CONF=/etc/containers/denoised-ci.conf

# Another job on a shared machine may hold the dpkg lock; wait for it rather than fail.
apt_install() {
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "container-base: installing ${missing[*]}"
  # With recommends: podman's storage and networking helpers are among them.
  apt_install "${missing[@]}"
fi

# Two podman defaults fail on these sandboxed machines: crun (podman's choice whenever it is
# installed) refuses their hybrid cgroup setup, so runc is named; and the open-file limit
# podman sets in every container exceeds the hard limit the sandbox grants ("error setting
# rlimit"), so containers get none of podman's default ulimits. A wrapper with its own config
# file keeps both choices out of the machine's system-wide podman settings.
mkdir -p "$(dirname "$CONF")"
printf '[containers]\ndefault_ulimits = []\n' >"$CONF"
cat >"$WRAPPER" <<EOF
#!/bin/sh
# Written by denoised's deploy/container-base.sh: podman with runc and no default ulimits.
CONTAINERS_CONF=$CONF exec podman --runtime runc "\$@"
EOF
chmod 755 "$WRAPPER"

# The Debian mirror apt already uses: the only package source these machines reach.
apt_mirror() {
  local uri
  uri=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

if ! "$WRAPPER" image exists "$BASE_IMAGE"; then
  mirror=$(apt_mirror)
  echo "container-base: building $BASE_IMAGE with debootstrap from $mirror (a few minutes)"
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  # minbase: essential packages and apt only; the Dockerfile installs python3 itself.
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >/dev/null
  # Drop what a base image does not ship: downloaded .debs and apt's package lists.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$WRAPPER" import - "$BASE_IMAGE" >/dev/null
fi

"$WRAPPER" run --rm --network host "$BASE_IMAGE" true
echo "container-base: ready ($BASE_IMAGE, $WRAPPER)"
