#!/usr/bin/env bash
# System packages the test suite needs beyond the virtual env: a real headless browser for
# the page's test (Debian's chromium and chromium-driver; a browser downloaded at run time
# cannot be had). Safe to run again: it installs only what is missing.
set -euo pipefail
say() { printf '[setup-test] %s\n' "$*"; }
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  say "browser: chromium and chromedriver already installed, reusing"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say "installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
say "browser installed: $(chromium --version 2>/dev/null || echo chromium)"
