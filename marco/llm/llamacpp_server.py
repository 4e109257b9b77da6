"""Start a local llama.cpp ``llama-server`` (tests, benchmarks, a CPU machine serving its own workers).

The binary comes from ``scripts/build_llama_server.sh`` (``make llama-server``), cached outside the clone;
``$MARCO_LLAMA_SERVER`` names another one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BINARY_ENV = "MARCO_LLAMA_SERVER"
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_llama_server.sh"


def find_llama_server() -> str | None:
    """The ``llama-server`` binary: ``$MARCO_LLAMA_SERVER``, the build script's cache, or one on PATH."""
    named = os.environ.get(BINARY_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    if BUILD_SCRIPT.is_file():
        try:
            path = subprocess.run(["sh", str(BUILD_SCRIPT), "--path"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            path = ""
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("llama-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, poll_s: float) -> bool:  # type: ignore[type-arg]
    """Poll ``URL/health`` until it answers 200 (True) or ``timeout_s`` passes (False); a RuntimeError when
    ``proc`` exits first, naming its exit code."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    return False


@dataclass
class LlamaServer:
    """One ``llama-server`` process on 127.0.0.1 (``start``/``stop``, or use it as a context manager).

    ``slots`` parallel sequences share ``ctx_per_slot * slots`` tokens of KV cache; ``threads`` compute
    threads; ``batch`` the logical batch size (tokens per decode call across all slots); ``cache_ram_mib``
    the host-memory prompt cache (llama.cpp's default is 8 GiB, too much for a small shared machine).
    """

    model: str
    slots: int = 8
    ctx_per_slot: int = 2048
    threads: int = 1  # on a small busy machine two spinning threads collapsed to 2 s a token (docs/engines.md)
    batch: int = 512
    cache_ram_mib: int = 512
    port: int = 0
    binary: str | None = None
    extra: list[str] = field(default_factory=list)
    log_path: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = self.binary or find_llama_server()
        if binary is None:
            raise FileNotFoundError("no llama-server binary: run `make llama-server` (or set $MARCO_LLAMA_SERVER)")
        return [
            binary, "-m", self.model, "--host", "127.0.0.1", "--port", str(self.port),
            "-np", str(self.slots), "-c", str(self.ctx_per_slot * self.slots), "-t", str(self.threads),
            "-tb", str(self.threads), "-b", str(self.batch), "--cache-ram", str(self.cache_ram_mib), "--no-webui", *self.extra,
        ]

    def start(self, timeout_s: float = 120.0) -> "LlamaServer":
        self.port = self.port or free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        try:
            if wait_healthy(self.proc, self.url, timeout_s, poll_s=0.2):
                return self
        except RuntimeError as e:
            raise RuntimeError(f"llama-server {e} (see {self.log_path or 'its log'})") from None
        self.stop()
        raise TimeoutError(f"llama-server on {self.url} not healthy after {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Kill it at once (fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
