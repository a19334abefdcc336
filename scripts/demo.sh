#!/usr/bin/env bash
# `make demo`: the main job on the bundled tiny model (stories260K) and data (CodeAlpaca 2k sample).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== mosft info tests/fixtures/stories260K"
./build/mosft info tests/fixtures/stories260K
