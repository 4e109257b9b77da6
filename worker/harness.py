"""Real worker and Flower processes for tests and benchmarks (started by pid, stopped by pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from worker.launch import celery_command, flower_argv, flower_env, worker_argv

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    """A started process (its own process group, so its pool children go with it)."""

    popen: subprocess.Popen[bytes]
    log: Path
    name: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no {text!r} after {timeout_s}s:\n{self.output()[-3000:]}")

    def children(self) -> list[int]:
        """Pids of this process's direct children (the prefork pool)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (main process and pool)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(5)
        else:
            self.kill(signal.SIGKILL)  # leftover pool children of a dead main process


def _start(cmd: Sequence[str], env: Mapping[str, str], log: Path, name: str) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    handle = open(log, "wb")
    popen = subprocess.Popen(list(cmd), cwd=ROOT, env=full_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    return Proc(popen, log, name)


def start_worker(
    env: Mapping[str, str],
    log_dir: Path,
    name: str = "w1",
    queues: str = "reason,synthesize,train",
    concurrency: int = 1,
    pool: str = "prefork",
    ready_timeout_s: float = 90.0,
) -> Proc:
    """A ``celery worker`` (the same arguments as ``marco worker``), returned once it consumes."""
    node = f"{name}@%h"
    proc = _start(celery_command(worker_argv(queues, concurrency, node, pool, "INFO")), env, log_dir / f"{name}.log", name)
    proc.wait_for(" ready.", ready_timeout_s)
    return proc


def start_flower(env: Mapping[str, str], log_dir: Path, port: int, basic_auth: str, ready_timeout_s: float = 60.0) -> Proc:
    argv = flower_argv(port, "127.0.0.1", basic_auth)
    proc = _start(celery_command(argv), {**env, **flower_env(basic_auth)}, log_dir / "flower.log", "flower")
    proc.wait_for("Visit me at", ready_timeout_s)
    return proc
