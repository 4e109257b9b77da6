#!/bin/sh
# Build llama.cpp's `llama-server` (the CPU server the served-model tests and bench/engine_throughput.py talk
# to) from the llama.cpp sources vendored in the llama-cpp-python sdist, once per machine.
#
# The binary is cached OUTSIDE the clone, keyed by the sdist version and the build variant:
#     ${MARCO_CACHE:-$HOME/.cache/marco}/llama-server/<version>/<variant>/bin/llama-server
# If it is already there this prints its path and does nothing else, so `make test` costs nothing after the
# first build (which takes 10+ minutes on 2 cores).
#
#   sh scripts/build_llama_server.sh           build if needed, print the binary's path (last line)
#   sh scripts/build_llama_server.sh --path    print where the binary is (or would be) and exit
#
# Settings (environment):
#   MARCO_CACHE             cache root (default ~/.cache/marco)
#   MARCO_LLAMA_CPP_VERSION llama-cpp-python sdist version (default pinned below)
#   MARCO_LLAMA_NATIVE      1 (default): -march=native, fastest, keyed by this CPU's flags so a cache shared
#                           between different machines never runs an illegal instruction; 0: portable build
#   MARCO_BUILD_JOBS        parallel compile jobs (default 2)
set -eu

VERSION="${MARCO_LLAMA_CPP_VERSION:-0.3.36}"
ROOT="${MARCO_CACHE:-$HOME/.cache/marco}/llama-server/$VERSION"
JOBS="${MARCO_BUILD_JOBS:-2}"
PYTHON="${PYTHON:-python3}"

if [ "${MARCO_LLAMA_NATIVE:-1}" = "1" ]; then
    flags_hash=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-10)
    VARIANT="native-${flags_hash:-unknown}"
    NATIVE=ON
else
    VARIANT="portable"
    NATIVE=OFF
fi
DIR="$ROOT/$VARIANT"
BIN="$DIR/bin/llama-server"

if [ "${1:-}" = "--path" ]; then
    echo "$BIN"
    exit 0
fi
if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$DIR"
# One build per cache entry even when CI and a developer start it at once: the second waits, then reuses.
exec 9>"$DIR/.lock"
flock 9
if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi

start=$(date +%s)
SRC="$DIR/src"
rm -rf "$SRC" "$DIR/build"
mkdir -p "$SRC"
echo "llama-server: downloading llama-cpp-python==$VERSION sdist into $SRC" >&2
"$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
tar -xzf "$SRC"/llama_cpp_python-"$VERSION".tar.gz -C "$SRC"
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$LLAMA/tools/server" ] || [ -d "$LLAMA/examples/server" ] || {
    echo "llama-server: no server sources under $LLAMA" >&2
    exit 1
}

GEN=""
command -v ninja >/dev/null 2>&1 && GEN="-G Ninja"
echo "llama-server: configuring ($VARIANT) in $DIR/build" >&2
# Static libraries so the one binary copied into bin/ runs on its own; no curl (models are local files);
# nothing but the server is built.
# shellcheck disable=SC2086
cmake -S "$LLAMA" -B "$DIR/build" $GEN \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DGGML_NATIVE="$NATIVE" \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON >&2
echo "llama-server: building with -j$JOBS (10+ minutes on 2 cores)" >&2
cmake --build "$DIR/build" --target llama-server -j "$JOBS" >&2

mkdir -p "$DIR/bin"
cp "$DIR/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
rm -rf "$SRC" "$DIR/build"
echo "llama-server: built in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
