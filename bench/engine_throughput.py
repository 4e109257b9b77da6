"""The same MCTS batch through the transformers backend and through llama.cpp's llama-server, side by side.

(a) Throughput: P MGSM problems searched in lockstep (continuous batching on both) with the product's
    defaults (ministep:32, budget 1024, rollouts up to 384 tokens, k=3), once in-process on the transformers
    backend and once through ``server+llamacpp:`` against a llama-server started here with ``--slots``
    parallel sequences. Generated tokens per second of each.
(b) The server's cost of top-5 log-probabilities: the same raw requests (P x k rows of ``--raw-tokens``
    tokens, end-of-sequence ignored) with ``n_probs: 5`` against ``n_probs: 0``.
(c) ``--sweep 4,8,16``: raw throughput at each number of slots (to choose the server's settings).

(d) ``--vllm``: the same MCTS batch on vLLM's offline engine (a subprocess of the vLLM environment,
    bench/vllm_offline_search.py) and through a vLLM OpenAI-compatible server started here, each with its
    start-up time and the peak memory (RSS) of its whole process group; ``--vllm-only`` runs only those.
(e) The machine's limit, measured in the same run (``bench/roofline.py``): the fastest matmul this CPU
    offers at the model's shapes (``--rows`` x 576 x 1536 etc., float32 and bfloat16, the same threads as the
    engines) over the model's FLOPs per token (its linear layers + attention at the mean context the
    transformers run attended to), and each engine's MCTS tokens/s as a fraction of it.

Needs the llama-server binary (``make llama-server``; ``--skip-server`` runs without it).
Last lines: ``server_vs_hf_throughput: X`` (when both ran) and ``best_mcts_vs_roofline: X`` (the best
engine's MCTS tokens/s / the limit).
Usage: python bench/engine_throughput.py [--problems 64] [--budget 1024] [--rollout 384] [--slots 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.llm import load_backend  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.llm.engine_map import SampleJob  # noqa: E402
from marco.llm.hf import smollm2_path  # noqa: E402
from marco.llm.llamacpp_server import LlamaServer, find_llama_server  # noqa: E402
from marco.llm.served import ServedBackend  # noqa: E402
from marco.llm.vllm_engine import VLLMSettings, cpu_id_list  # noqa: E402
from marco.llm.vllm_server import VLLMServer, vllm_python  # noqa: E402
from marco.search.base import SearchConfig  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from bench.mcts_batch import dataset_name, mcts_batch  # noqa: E402
from bench.roofline import machine_limit, model_flops_per_token  # noqa: E402


def search(backend: Any, task: Any, problems: list[Any], config: SearchConfig) -> tuple[int, float, int]:
    """Tokens generated, seconds, correct answers of one lockstep MCTS run."""
    driver = LockstepDriver(backend, task, config)
    t = time.perf_counter()
    results = driver.run(problems)
    return driver.stats.generated_tokens, time.perf_counter() - t, sum(bool(r.correct) for r in results)


def raw_requests(backend: Any, task: Any, problems: list[Any], k: int, tokens: int) -> list[GenerationRequest]:
    prompts = [backend.apply_chat_template(task.messages(p), "<Thought>\n") for p in problems]
    return [GenerationRequest(p, tokens, temperature=0.7, n=k, seed=i, ignore_eos=True) for i, p in enumerate(prompts)]


def raw_server_run(served: ServedBackend, requests: list[GenerationRequest], n_probs: int) -> tuple[int, float]:
    """All rows in flight at once straight to /completion with ``n_probs``: tokens, seconds."""
    proto, client = served.protocol, served.client
    jobs = [SampleJob(i, j, r) for i, r in enumerate(requests) for j in range(r.n)]

    def one(job: SampleJob) -> int:
        body = {**proto.payload(job), "n_probs": n_probs, "stream": False}
        return int(client.post_json(proto.path, body)["tokens_predicted"])

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        tokens = sum(pool.map(one, jobs))
    return tokens, time.perf_counter() - t



class GroupPeakRSS:
    """The peak summed RSS of every process in a process group, sampled every 0.2 s in a thread (vLLM runs
    an API server, an engine core and a worker process)."""

    def __init__(self, pgid: int) -> None:
        import threading

        self.pgid, self.peak, self._stop = pgid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[2]) == self.pgid:  # pgrp
                    total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss pages
            except (OSError, ValueError, IndexError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def bench_cpus(threads: int) -> str:
    """The first ``threads`` CPUs this process may use, as vLLM's thread-binding list."""
    return cpu_id_list(sorted(os.sched_getaffinity(0))[:threads])


def vllm_offline_row(args: Any) -> tuple[str, int, float, str]:
    """The MCTS batch on vLLM's offline engine, in a subprocess of the vLLM environment."""
    import json
    import subprocess

    python = vllm_python()
    if python is None:
        raise SystemExit("no vLLM environment: `make install` makes .venv-vllm (or set $MARCO_VLLM_PYTHON)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": str(args.threads),
           "MARCO_VLLM_CPU_THREADS": bench_cpus(args.threads)}
    cmd = [python, str(Path(__file__).with_name("vllm_offline_search.py")), str(args.problems), str(args.budget),
           str(args.rollout), str(args.children), str(args.vllm_rows)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    mem = GroupPeakRSS(proc.pid)
    out, _ = proc.communicate()
    peak = mem.stop()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"vLLM offline run failed ({proc.returncode}): {out[-2000:]}")
    r = json.loads(line[len("RESULT "):])
    print(f"vLLM offline: {r['tokens']} tokens in {r['secs']:.1f}s", file=sys.stderr, flush=True)
    return (f"vLLM offline engine (max rows {args.vllm_rows})", r["tokens"], r["secs"],
            f"{r['correct']}/{args.problems} correct · start {r['startup_s']:.0f}s · peak {peak:.0f} MiB")


def vllm_server_row(args: Any, task: Any, problems: list[Any], config: SearchConfig) -> tuple[str, int, float, str]:
    """The MCTS batch through a vLLM OpenAI-compatible server started here (from the vLLM environment)."""
    server = VLLMServer("smollm2", VLLMSettings(max_rows=args.vllm_rows, cpu_threads=bench_cpus(args.threads)),
                        threads=args.threads)
    t = time.perf_counter()
    server.start()
    startup = time.perf_counter() - t
    mem = GroupPeakRSS(server.proc.pid if server.proc else 0)
    try:
        served = ServedBackend.connect(server.spec())
        served.generate([GenerationRequest(served.encode("Hello"), 4)])
        tokens, secs, correct = search(served, task, problems, config)
        served.close()
    finally:
        server.stop()
        peak = mem.stop()
    print(f"vLLM server: {tokens} tokens in {secs:.1f}s", file=sys.stderr, flush=True)
    return (f"vLLM server (max rows {args.vllm_rows})", tokens, secs,
            f"{correct}/{len(problems)} correct · start {startup:.0f}s · peak {peak:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=64, help="problems searched in lockstep (marco run's --chunk)")
    ap.add_argument("--budget", type=int, default=1024, help="tokens per search (the CLI default)")
    ap.add_argument("--rollout", type=int, default=384, help="max tokens of one rollout (the product default)")
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--slots", type=int, default=16, help="llama-server parallel sequences (-np)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="compute threads of every engine (torch, llama-server, vLLM's CPU worker); default all CPUs")
    ap.add_argument("--batch", type=int, default=512, help="llama-server logical batch size (-b)")
    ap.add_argument("--raw-tokens", type=int, default=64, help="tokens per row of the n_probs comparison")
    ap.add_argument("--sweep", default="", help="comma-separated slot counts to time raw generation at")
    ap.add_argument("--skip-hf", action="store_true", help="only the server (no ratio)")
    ap.add_argument("--skip-server", action="store_true", help="no llama-server (the other engines and the limit)")
    ap.add_argument("--hf-rows", type=int, default=None, help="the transformers loop's max_batch_rows (default 128)")
    ap.add_argument("--dtype", default=None, help="transformers dtype: auto|float32|bfloat16 (default $MARCO_DTYPE/auto)")
    ap.add_argument("--rows", type=int, default=128,
                    help="rows of the roofline's matmuls (the transformers loop's max_batch_rows)")
    ap.add_argument("--vllm", action="store_true", help="also vLLM's offline engine and server (needs .venv-vllm)")
    ap.add_argument("--vllm-only", action="store_true", help="only the vLLM rows")
    ap.add_argument("--vllm-rows", type=int, default=128, help="vLLM max_num_seqs (the widest round: 2 x problems)")
    args = ap.parse_args()
    if args.vllm_only:
        vllm_only(args)
        return
    if not args.skip_server and find_llama_server() is None:
        sys.exit("no llama-server binary: run `make llama-server` (or set $MARCO_LLAMA_SERVER)")

    task, problems, config = mcts_batch(args.problems, args.budget, args.rollout, args.children)
    gguf = os.path.join(*smollm2_path())
    rows: list[tuple[str, int, float, str]] = []
    mcts: dict[str, float] = {}  # engine -> MCTS tokens/s
    memory: tuple[float, int, int] | None = None  # the transformers run's mean rows per step, weight and KV bytes
    context = args.rollout / 2 + 200.0  # attended tokens per decoded one, replaced by the transformers run's

    hf_tps = None
    if not args.skip_hf:
        import torch

        torch.set_num_threads(args.threads)  # the same cores for both engines
        hf = load_backend("smollm2", dtype=args.dtype, max_batch_rows=args.hf_rows)
        hf.generate([GenerationRequest(hf.encode("Hello"), 4)])  # warm-up
        hf.decoded_rows = hf.attended_tokens = hf.decode_steps = 0
        tokens, secs, correct = search(hf, task, problems, config)
        hf_tps = tokens / secs
        hf_dtype = str(hf.kv_spec.dtype).removeprefix("torch.")
        context = hf.attended_tokens / max(1, hf.decoded_rows)
        memory = (hf.decoded_rows / max(1, hf.decode_steps), sum(p.numel() * p.element_size() for p in hf.model.parameters()),
                  hf.kv_spec.token_bytes)
        rows.append((f"transformers (in-process, {hf_dtype})", tokens, secs, f"{correct}/{len(problems)} correct"))
        mcts[f"transformers ({hf_dtype})"] = tokens / secs
        print(f"transformers: {tokens} tokens in {secs:.1f}s", file=sys.stderr, flush=True)
        del hf

    if not args.skip_server:
        server_tps, (with_t, with_s), (without_t, without_s) = server_runs(args, task, problems, config, gguf, rows)
        mcts["llama-server (Q4_1)"] = server_tps
    if args.vllm:
        for row in (vllm_offline_row(args), vllm_server_row(args, task, problems, config)):
            rows.append(row)
            mcts[row[0]] = row[1] / row[2]

    print(f"{len(problems)} {dataset_name()} problems · mcts ministep:32 "
          f"k={args.children} budget {args.budget} rollout<={args.rollout} · SmolLM2-135M · "
          f"{os.cpu_count()} CPUs · load {os.getloadavg()[0]:.1f}")
    print(f"{'run':<44}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}  note")
    for name, t, s, note in rows:
        print(f"{name:<44}{t:>8}{s:>10.1f}{t / s:>10.1f}  {note}")
    if not args.skip_server:
        print(f"top5_logprob_cost (n_probs 5 time / n_probs 0 time, per token): "
              f"{(with_s / with_t) / (without_s / without_t):.3f}")
        if hf_tps is not None:
            print(f"server_vs_hf_throughput: {server_tps / hf_tps:.3f}")
    print_roofline(mcts, args.rows, args.threads, context, memory)


def read_bandwidth(mib: int = 512) -> float:
    """GB/s of reading a ``mib`` MiB tensor once (best of 5: ``sum`` streams it through the cores)."""
    import torch

    x = torch.ones(mib << 18)  # float32
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def print_roofline(mcts: dict[str, float], rows: int, threads: int, context: float,
                   memory: tuple[float, int, int] | None = None) -> None:
    """The machine's limit (fastest matmul at the model's shapes / FLOPs per token) and each engine's MCTS
    tokens/s as a fraction of it; last line ``best_mcts_vs_roofline``."""
    import torch

    from bench.roofline import smollm2_config

    torch.set_num_threads(threads)
    config = smollm2_config()
    fpt = model_flops_per_token(config, context)
    limits = machine_limit(config, rows)
    print(f"roofline: {fpt / 1e9:.3f} GFLOP per token (mean context {context:.0f}), {rows}-row matmuls at "
          f"{threads} threads, load {os.getloadavg()[0]:.1f}")
    for r in limits:
        shapes = ", ".join(f"{i}x{o} {g:.0f}" for i, o, g in r.per_shape)
        print(f"  {str(r.dtype).removeprefix('torch.'):<9} {r.gflops:7.1f} GFLOP/s -> {r.tokens_per_s(fpt):7.1f} "
              f"tokens/s   (GFLOP/s per in x out: {shapes})")
    limit = limits[0].tokens_per_s(fpt)
    for name, tps in mcts.items():
        print(f"  {name:<40} MCTS {tps:7.1f} tokens/s = {tps / limit:.3f} of the limit")
    if memory is not None:
        # not the limit, a second reading of it: a decode step reads every weight once and every
        # row's keys and values once, so at the run's mean width it can go no faster than memory streams them
        width, weight_bytes, kv_token_bytes = memory
        gbps = read_bandwidth()
        step_s = (weight_bytes + width * context * kv_token_bytes) / (gbps * 1e9)
        print(f"  memory: {gbps:.1f} GB/s read; at the transformers run's {width:.1f} rows per step a step reads "
              f"{weight_bytes / 2**20:.0f} MiB of weights + {width * context * kv_token_bytes / 2**20:.0f} MiB of KV: "
              f"at most {width / step_s:.0f} tokens/s ({width / step_s / limit:.3f} of the limit)")
    if mcts:
        print(f"best_mcts_vs_roofline: {max(mcts.values()) / limit:.3f}")


def server_runs(args: argparse.Namespace, task: Any, problems: list[Any], config: SearchConfig, gguf: str,
                rows: list[tuple[str, int, float, str]]) -> tuple[float, tuple[int, float], tuple[int, float]]:
    """The llama-server part: MCTS, raw rows with and without top-5, the slot sweep (rows appended)."""
    log = os.path.join(tempfile.gettempdir(), f"marco-bench-llama-server-{os.getpid()}.log")
    with LlamaServer(gguf, slots=args.slots, threads=args.threads, batch=args.batch, log_path=log) as server:
        served = ServedBackend.connect(f"server+llamacpp:{server.url}?tokenizer=smollm2")
        served.generate([GenerationRequest(served.encode("Hello"), 4)])
        try:
            tokens, secs, correct = search(served, task, problems, config)
        except Exception:
            exit_code = server.proc.poll() if server.proc is not None else None
            with open(log, errors="replace") as f:
                tail = f.read()[-3000:]
            print(f"llama-server failed mid-run (exit code {exit_code}); the end of its log {log}:\n{tail}",
                  file=sys.stderr, flush=True)
            raise
        server_tps = tokens / secs
        print(f"llama-server: {tokens} tokens in {secs:.1f}s", file=sys.stderr, flush=True)
        rows.append((f"llama-server (-np {args.slots} -t {args.threads} -b {args.batch})", tokens, secs,
                     f"{correct}/{len(problems)} correct"))
        reqs = raw_requests(served, task, problems, args.children, args.raw_tokens)
        with_t, with_s = raw_server_run(served, reqs, 5)
        without_t, without_s = raw_server_run(served, reqs, 0)
        rows.append(("raw rows, n_probs 5", with_t, with_s, ""))
        rows.append(("raw rows, n_probs 0", without_t, without_s, ""))
        served.close()

    for slots in [int(s) for s in args.sweep.split(",") if s.strip()]:
        with LlamaServer(gguf, slots=slots, threads=args.threads, batch=args.batch) as server:
            served = ServedBackend.connect(f"server+llamacpp:{server.url}?tokenizer=smollm2")
            t, s = raw_server_run(served, raw_requests(served, task, problems, args.children, args.raw_tokens), 5)
            rows.append((f"sweep: raw rows, -np {slots}", t, s, ""))
            served.close()
    return server_tps, (with_t, with_s), (without_t, without_s)


def vllm_only(args: Any) -> None:
    """``--vllm-only``: the two vLLM rows (offline engine, server) and nothing else."""
    task, problems, config = mcts_batch(args.problems, args.budget, args.rollout, args.children)
    rows = [vllm_offline_row(args), vllm_server_row(args, task, problems, config)]
    print(f"{len(problems)} {dataset_name()} problems · mcts ministep:32 k={args.children} "
          f"budget {args.budget} rollout<={args.rollout} · SmolLM2-135M · {os.cpu_count()} CPUs · "
          f"vLLM dtype {VLLMSettings().resolved(gpu=False).dtype}")
    print(f"{'run':<44}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}  note")
    for name, t, s, note in rows:
        print(f"{name:<44}{t:>8}{s:>10.1f}{t / s:>10.1f}  {note}")
    print(f"vllm_server_vs_offline_throughput: {(rows[1][1] / rows[1][2]) / (rows[0][1] / rows[0][2]):.3f}")


if __name__ == "__main__":
    main()
