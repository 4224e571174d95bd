#!/usr/bin/env bash
# Loads Spillway's dashboard in headless Chromium (Debian's `chromium`): saves a
# screenshot, then prints the page's DOM after its script has polled /v1/stats for
# a few (virtual) seconds, for the caller to check the charts.
# Usage: tests/browser/dashboard.sh URL SCREENSHOT.png
set -euo pipefail
url=$1
shot=$2
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no chromium found (Debian: apt-get install chromium)" >&2
  exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: CI runs as root. Virtual time runs the page's timers without
# waiting for the wall clock, and pauses while its fetches are in flight.
flags=(--headless=new --no-sandbox --disable-gpu --hide-scrollbars --no-first-run
       --user-data-dir="$profile" --window-size=1640,900 --virtual-time-budget=6000)
"$browser" "${flags[@]}" --screenshot="$shot" "$url" >/dev/null 2>&1
"$browser" "${flags[@]}" --dump-dom "$url" 2>/dev/null
