#!/usr/bin/env bash
# Make sure a Chromium binary is on this machine, for the console's browser tests (Playwright drives
# the system browser: Playwright's own browser download cannot be fetched here). Debian package `chromium`.
set -euo pipefail
for b in /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -x "$b" ]; then exit 0; fi
done
if [ "$(id -u)" != 0 ]; then
  echo "chromium is missing; install it with: sudo apt-get install -y chromium" >&2
  echo "(the browser tests will be skipped)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium
