#!/usr/bin/env bash
# Install what the tests need (the CPU torch wheel first, so pip never pulls CUDA builds) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m pytest "$@"
