"""``run_sft``: resolve the base model once, then train in-process (one process) or under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Callable

import marco
from marco.sft.base_model import resolve_base
from marco.sft.config import SFTConfig, SFTResult

CheckpointCallback = Callable[[SFTResult], None]


def torchrun_command(config_path: str, nproc: int) -> list[str]:
    """The launch command: one rank per process on this node, on a free rendezvous port."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "-m", "marco.sft.train", "--config", config_path,
    ]  # fmt: skip


def _child_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    # The project may run from a checkout rather than an install: let the ranks import the same `marco`.
    root = str(Path(marco.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    # torchrun pins OMP_NUM_THREADS=1 when unset; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_sft(config: SFTConfig, on_checkpoint: CheckpointCallback | None = None,
            check: Callable[[], None] | None = None) -> SFTResult:
    """Fine-tune ``config.base`` on ``config.data`` or its weighted ``config.sources``; return the checkpoint, losses, metrics and tokens/s.

    With ``nproc > 1`` the training runs under ``torchrun`` in a subprocess (its log in
    ``output_dir/train.log``); otherwise in this process. ``on_checkpoint`` is called with the result once
    the checkpoint is saved: the store registers it there (``models`` row with its lineage). ``check`` is
    called after every training step (in process) or every second (torchrun); it raises to stop the run
    (a job that lost its lease), and a torchrun child is terminated first.
    """
    from marco.sft.data import load_chats

    if not config.mix:
        raise ValueError("no training data: give data (one path) or sources ([{path, weight}, ...])")
    for source in config.mix:  # bad data fails here, in one line, before any model is loaded or rank started
        load_chats(source["path"])
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = replace(config, output_dir=str(out.resolve()), base_path=resolve_base(config.base))
    config_path = out / "sft_config.json"
    config.to_json(config_path)

    if config.nproc == 1:
        from marco.sft.train import train

        result = train(config, check=check)
    else:
        log_path = out / "train.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                torchrun_command(str(config_path), config.nproc),
                stdout=log, stderr=subprocess.STDOUT, env=_child_env(config.nproc),
            )  # fmt: skip
            try:
                while proc.poll() is None:
                    if check is not None:
                        check()
                    try:
                        proc.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        pass
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        if proc.returncode != 0:
            with log_path.open(errors="replace") as f:
                tail = [line.rstrip() for line in deque(f, maxlen=400) if line.strip()]
            cause = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
            raise RuntimeError(f"SFT under torchrun failed (exit {proc.returncode}): {cause} — see {log_path}")
        result = SFTResult.from_json(out / "result.json")
    if on_checkpoint is not None:
        on_checkpoint(result)
    return result
