#!/usr/bin/env bash
# Installs what tests/deploy needs beyond the Python venv, on a CI machine or a developer's:
# Debian's prometheus (with promtool) for the live scrape test, and podman plus a locally
# built Debian base image for the container test (no image registry is reachable, so
# shared/tools/container-base.sh bootstraps one). Idempotent: a second run takes seconds.
# Needs root for apt; without it, or where podman cannot run, it says so and the tests
# that need the missing piece skip with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  echo "deploy/ci-setup: not root; skipping apt installs (tests/deploy skips what is missing)"
  exit 0
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || echo "deploy/ci-setup: installing prometheus failed"
fi

base=../shared/tools/container-base.sh
if [ -f "$base" ]; then
  bash "$base" || echo "deploy/ci-setup: container base image not ready; the container test will skip"
else
  echo "deploy/ci-setup: $base not found; the container test will skip"
fi
exit 0
