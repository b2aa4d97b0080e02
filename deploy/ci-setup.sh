#!/usr/bin/env bash
# Installs what tests/deploy needs beyond the Python venv, on a CI machine or a developer's:
# Debian's prometheus (with promtool) for the live scrape test, and podman plus a locally
# built Debian base image for the container test (no image registry is reachable, so
# deploy/container-base.sh bootstraps one). Idempotent: a second run takes seconds.
# Needs root for apt. A step that fails is reported and the run goes on: the tests that need
# the missing piece then fail under CI=true and skip elsewhere, naming it.
set -uo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  echo "deploy/ci-setup: not root; skipping apt installs (tests/deploy reports what is missing)"
  exit 0
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || echo "deploy/ci-setup: installing prometheus failed"
fi

bash deploy/container-base.sh || echo "deploy/ci-setup: the container base image is not ready"
exit 0
