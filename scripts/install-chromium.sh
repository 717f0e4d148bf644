#!/usr/bin/env bash
# Debian's Chromium and a Korean font for the dashboard's browser tests (tests/dashboard);
# idempotent. The tests drive /usr/bin/chromium through Playwright and skip, saying why,
# without it. Without a Korean font the Korean page renders as empty boxes, and its
# layout checks (nothing cut off at 1280/1440 px) would measure the wrong glyphs.
set -euo pipefail

packages=()
if [ -x /usr/bin/chromium ]; then
  echo "install-chromium: /usr/bin/chromium already installed ($(/usr/bin/chromium --version 2>/dev/null || echo 'version unknown'))"
else
  packages+=(chromium)
fi
# Nanum (Debian's fonts-nanum, ~10 MB) covers Hangul; the page's CSS lists it.
if command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list :lang=ko 2>/dev/null)" ]; then
  echo "install-chromium: a Korean font is already installed ($(fc-list :lang=ko family | head -n 1))"
else
  packages+=(fonts-nanum fontconfig)
fi
if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: apt-get not found; install ${packages[*]} yourself" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install-chromium: needs root (or sudo) to run apt-get" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${packages[@]}"
/usr/bin/chromium --version || true
fc-list :lang=ko family | head -n 1 || true
echo "install-chromium: done"
