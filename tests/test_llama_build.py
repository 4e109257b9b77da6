"""scripts/build_llama_server.sh keeps only a llama-server that runs on this CPU (issue 16).

The real build takes 10+ minutes, so these tests lay fake binaries into a private cache: one that dies of
SIGILL as it loads the model (what ggml's AMX code did on a Xeon: exit -4), and a tiny HTTP server that
answers /health and /completion with top-k probabilities like llama-server. The script's real smoke test
(scripts/llama_smoke.py) runs against them; no binary here is ever built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
VERSION = "9.9.9-test"

CRASH = "#!/bin/sh\nkill -ILL $$\n"
SERVER = f"""#!{sys.executable}
import json, sys, http.server
from pathlib import Path
Path(__file__).with_name("started").open("a").write("x")
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self): self.reply({{"status": "ok"}})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert req["n_probs"] == 5
        self.reply({{"content": " Paris", "completion_probabilities": [{{"id": 1, "top_logprobs": []}}]}})
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
FAILS = "#!/bin/sh\necho 'error: unknown argument' >&2\nexit 1\n"


@pytest.fixture
def cache(tmp_path: Path) -> dict[str, str]:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    return {**os.environ, "MARCO_CACHE": str(tmp_path / "cache"), "MARCO_LLAMA_CPP_VERSION": VERSION,
            "MARCO_LLAMA_SMOKE_MODEL": str(model), "PYTHON": sys.executable, "MARCO_LLAMA_NATIVE": "1"}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


def variants(env: dict[str, str]) -> list[str]:
    return run(env, "--variants").stdout.split()


def lay(env: dict[str, str], variant: str, script: str) -> Path:
    binary = Path(env["MARCO_CACHE"]) / "llama-server" / VERSION / variant / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text(script)
    binary.chmod(0o755)
    return binary


def test_the_variants_start_native_and_drop_amx_next(cache) -> None:
    chain = variants(cache)
    assert chain[0].startswith("native-") and chain[1] == chain[0] + "-noamx"
    assert len(chain) == len(set(chain)) >= 2
    assert variants({**cache, "MARCO_LLAMA_NATIVE": "0"}) == ["portable"]


def test_a_binary_that_crashes_falls_back_to_the_next_variant_and_is_remembered(cache) -> None:
    first, second = variants(cache)[:2]
    crashing = lay(cache, first, CRASH)
    good = lay(cache, second, SERVER)
    assert run(cache, "--path").stdout.strip() == str(crashing)  # not smoke-tested yet: the first to try
    out = run(cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(good)
    assert "SIGILL" in out.stderr and "trying the next variant" in out.stderr
    assert "SIGILL" in (crashing.parent / "smoke-failed").read_text()
    assert (good.parent / "smoke-ok").is_file() and not (crashing.parent / "smoke-ok").exists()
    assert (good.parent / "started").read_text() == "x"
    # afterwards: no smoke, no build, the same binary (also for the tests' lookup)
    again = run(cache)
    assert again.returncode == 0 and again.stdout.strip() == str(good)
    assert (good.parent / "started").read_text() == "x"
    assert run(cache, "--path").stdout.strip() == str(good)


def test_a_cached_binary_without_the_marker_is_smoke_tested_once(cache) -> None:
    first = variants(cache)[0]
    binary = lay(cache, first, SERVER)
    for _ in range(2):
        out = run(cache)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(binary)
    assert (binary.parent / "started").read_text() == "x"  # started by the first call only
    assert (binary.parent / "smoke-ok").is_file()


def test_every_variant_crashing_is_an_error_naming_them(cache) -> None:
    chain = variants(cache)
    for v in chain:
        lay(cache, v, CRASH)
    out = run(cache)
    assert out.returncode == 1
    assert "every variant crashed on this CPU" in out.stderr and all(v in out.stderr for v in chain)
    assert run(cache).returncode == 1  # remembered: nothing is started again
    assert "skipping" in run(cache).stderr


def test_a_smoke_failure_that_is_not_a_crash_stops_without_marking(cache) -> None:
    first = variants(cache)[0]
    binary = lay(cache, first, FAILS)
    out = run(cache)
    assert out.returncode == 1
    assert "failed without a crash" in out.stderr and "unknown argument" in out.stderr
    assert not (binary.parent / "smoke-failed").exists() and not (binary.parent / "smoke-ok").exists()
