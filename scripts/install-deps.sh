#!/usr/bin/env bash
# Installs the Debian packages mosft builds against, when missing.
# As root: apt-get install. Otherwise: print the exact command and stop (exit 1).
set -euo pipefail
pkgs=(libcjson-dev libcurl4-openssl-dev zlib1g-dev check libsubunit-dev pkg-config)
missing=()
have_hdr() { [ -f "$1" ]; }
have_hdr /usr/include/cjson/cJSON.h || missing+=(libcjson-dev)
have_hdr /usr/include/x86_64-linux-gnu/curl/curl.h || have_hdr /usr/include/curl/curl.h || missing+=(libcurl4-openssl-dev)
have_hdr /usr/include/zlib.h || missing+=(zlib1g-dev)
have_hdr /usr/include/check.h || missing+=(check)
ls /usr/lib/*/libsubunit.a >/dev/null 2>&1 || missing+=(libsubunit-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" = 0 ]; then
  echo "installing missing build dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  $cmd >/dev/null
else
  echo "error: missing build dependencies: ${missing[*]}"
  echo "hint: run as root: sudo $cmd"
  exit 1
fi
