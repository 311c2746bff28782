#!/usr/bin/env bash
# Real-consumer tests that need a native build: llama.cpp (via the llama-cpp-python source package).
#
#   scripts/test-consumers.sh [pytest args...]
#
# Downloads the llama-cpp-python sdist (it vendors llama.cpp, incl. convert_hf_to_gguf.py and
# convert_lora_to_gguf.py), builds libllama with cmake once, installs the Python binding against that library
# and runs `pytest tests/consumers -m llamacpp`. The build takes several minutes the first time; later runs
# reuse it. Work directory: $ADAPTERFMT_CONSUMER_WORK (default ~/.cache/adapterfmt-consumers).
# Per-architecture max |Δlogits| (ours vs llama.cpp's own converter) is printed at the end.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WORK="${ADAPTERFMT_CONSUMER_WORK:-$HOME/.cache/adapterfmt-consumers}"
SRC="$WORK/llama_cpp_python-$VERSION"
BUILD="$WORK/build-$VERSION"
PYTHON="${PYTHON:-python}"
JOBS="$(nproc 2>/dev/null || echo 2)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$WORK"

# 1. A C/C++ toolchain and cmake.
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q cmake build-essential
fi

# 2. The source package (llama.cpp is vendored inside it); its build backend is needed to read its metadata.
"$PYTHON" -m pip install -q scikit-build-core diskcache jinja2 typing-extensions
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps --no-build-isolation \
        "llama-cpp-python==$VERSION" -d "$WORK"
    tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi

# 3. libllama (shared), built once.
if ! ls "$BUILD"/bin/libllama.so* >/dev/null 2>&1; then
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
    cmake --build "$BUILD" -j "$JOBS" --target llama
fi
LIB_DIR="$(dirname "$(ls "$BUILD"/bin/libllama.so* | head -n 1)")"

# 4. The Python binding, installed without building its own copy of llama.cpp.
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" \
        2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$PYTHON" -m pip install -q --no-build-isolation --no-deps "$SRC"
fi

# 5. The tests, against that build.
export LLAMA_CPP_LIB_PATH="$LIB_DIR"
export ADAPTERFMT_LLAMA_CPP_DIR="$SRC/vendor/llama.cpp"
export ADAPTERFMT_CONSUMER_RESULTS="$WORK/llamacpp-results.jsonl"
rm -f "$ADAPTERFMT_CONSUMER_RESULTS"
cd "$REPO"
status=0
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/consumers \
    -m llamacpp "$@" || status=$?
# The `check --target llama.cpp` rules against llama.cpp's own convert_lora_to_gguf.py.
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/ops/test_check.py \
    -k real_llamacpp "$@" || status=$?
"$PYTHON" - "$ADAPTERFMT_CONSUMER_RESULTS" <<'EOF'
import json, pathlib, sys
path = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
fmt = lambda v: f"{v:.2e}" if isinstance(v, float) else str(v if v is not None else "")
print("max |Δlogits| against transformers+PEFT (import: what we read, run in PEFT, against llama.cpp on that file)")
print(f"{'case':<34} {'ours':>9} {'llama.cpp converter':>20} {'base alone':>10} {'import ours':>11} "
      f"{'import theirs':>13}")
for r in rows:
    print(f"{r['case']:<34} {fmt(r.get('ours')):>9} {fmt(r.get('llama.cpp converter'))[:60]:>20} "
          f"{fmt(r.get('base floor')):>10} {fmt(r.get('import ours')):>11} {fmt(r.get('import theirs')):>13}")
EOF
exit $status
