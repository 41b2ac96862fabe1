#!/usr/bin/env bash
# Install everything, then run the main job end to end on a local S3 server (SeaweedFS):
# generate a sample model, publish it, list and inspect it, pull it, and read it back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m modelfs.dev.demo "$@"
