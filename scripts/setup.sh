#!/usr/bin/env bash
# One-step set-up on a fresh machine: the fonts the glyph corpus renders from, then fsdeploy with test extras.
# Safe to run again (apt and pip skip what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

FONTS="fonts-noto-core fonts-dejavu-core fonts-freefont-ttf"
if ! fc-list 2>/dev/null | grep -qi "NotoSans-Regular"; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $FONTS >/dev/null
  else
    echo "setup: apt-get not found; install the Debian/Ubuntu packages $FONTS (or any Noto/DejaVu/FreeFont TTFs) for the glyph corpus" >&2
  fi
fi

python -m pip install -q -e ".[dev]"
