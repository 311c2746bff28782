#!/usr/bin/env bash
# Install adapterfmt (CPU torch wheel first) and run the end-to-end demo on a tiny local model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0
python3 -m pip install --quiet --disable-pip-version-check -e .
adapterfmt demo "$@"
