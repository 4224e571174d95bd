#!/usr/bin/env bash
# Loads Spillway's dashboard in headless Chromium (Debian's `chromium`): saves a
# screenshot, then prints the page's DOM after its script has polled /v1/stats for
# a minute of virtual time, for the caller to check the charts.
# Usage: tests/browser/dashboard.sh URL SCREENSHOT.png [WIDTH,HEIGHT]
# (default 1640,900, a desktop; 390,844 is a phone's width).
set -euo pipefail
url=$1
shot=$2
size=${3:-1640,900}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no chromium found (Debian: apt-get install chromium)" >&2
  exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: CI runs as root. Virtual time runs the page's timers without
# waiting for the wall clock, and pauses while its fetches are in flight: the
# page polls every 2 s of it, about 30 times, as fast as the stats answer.
flags=(--headless=new --no-sandbox --disable-gpu --hide-scrollbars --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --user-data-dir="$profile" --window-size="$size" --virtual-time-budget=60000)
"$browser" "${flags[@]}" --screenshot="$shot" "$url" >/dev/null 2>&1
"$browser" "${flags[@]}" --dump-dom "$url" 2>/dev/null
