#!/usr/bin/env bash
# promtool, for the test that lints GET /metrics (`promtool check metrics`); idempotent.
# Debian's `prometheus` package ships it. Only the promtool binary is taken out of the package
# (apt-get download + dpkg-deb -x) into .tools/bin, so no Prometheus server is installed or
# started. A promtool already on PATH is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/bin/promtool

if [ -x "$dest" ]; then
  echo "install-promtool: $dest already installed ($("$dest" --version 2>&1 | head -1))"
  exit 0
fi
if found=$(command -v promtool); then
  mkdir -p .tools/bin
  ln -sf "$found" "$dest"
  echo "install-promtool: using $found"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-promtool: apt-get not found; put promtool on PATH or at $dest" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download needs the package lists; refresh them once when the package is unknown.
if ! (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1); then
  apt-get update -qq >/dev/null 2>&1 || true
  (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1) || {
    echo "install-promtool: could not download Debian's prometheus package" >&2
    exit 1
  }
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p .tools/bin
install -m 0755 "$work/root/usr/bin/promtool" "$dest"
echo "install-promtool: installed $("$dest" --version 2>&1 | head -1)"
