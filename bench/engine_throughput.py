"""The same MCTS batch through the transformers backend and through llama.cpp's llama-server, side by side.

(a) Throughput: P MGSM problems searched in lockstep (continuous batching on both) with the product's
    defaults (ministep:32, budget 1024, rollouts up to 384 tokens, k=3), once in-process on the transformers
    backend and once through ``server+llamacpp:`` against a llama-server started here with ``--slots``
    parallel sequences. Generated tokens per second of each.
(b) The server's cost of top-5 log-probabilities: the same raw requests (P x k rows of ``--raw-tokens``
    tokens, end-of-sequence ignored) with ``n_probs: 5`` against ``n_probs: 0``.
(c) ``--sweep 4,8,16``: raw throughput at each number of slots (to choose the server's settings).

Needs the llama-server binary (``make llama-server``). Last line: ``server_vs_hf_throughput: X``.
Usage: python bench/engine_throughput.py [--problems 32] [--budget 1024] [--rollout 384] [--slots 16]
"""

from __future__ import annotations

import argparse
import os
import sys
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
from marco.search.base import SearchConfig  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from marco.tasks import default_data_dir, get_task  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--budget", type=int, default=1024, help="tokens per search (the CLI default)")
    ap.add_argument("--rollout", type=int, default=384, help="max tokens of one rollout (the product default)")
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--slots", type=int, default=16, help="llama-server parallel sequences (-np)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of both engines (torch and llama-server)")
    ap.add_argument("--batch", type=int, default=512, help="llama-server logical batch size (-b)")
    ap.add_argument("--raw-tokens", type=int, default=64, help="tokens per row of the n_probs comparison")
    ap.add_argument("--sweep", default="", help="comma-separated slot counts to time raw generation at")
    ap.add_argument("--skip-hf", action="store_true", help="only the server (no ratio)")
    args = ap.parse_args()
    if find_llama_server() is None:
        sys.exit("no llama-server binary: run `make llama-server` (or set $MARCO_LLAMA_SERVER)")

    data = default_data_dir()
    task = get_task("mgsm" if data else "demo")
    problems = task.load(data, ["en"], args.problems) if data else task.load(None, None, args.problems)
    config = SearchConfig(strategy="mcts", action="ministep:32", budget=args.budget, children=args.children,
                          max_answer_tokens=args.rollout, seed=1)
    gguf = os.path.join(*smollm2_path())
    rows: list[tuple[str, int, float, str]] = []

    hf_tps = None
    if not args.skip_hf:
        import torch

        torch.set_num_threads(args.threads)  # the same cores for both engines
        hf = load_backend("smollm2")
        hf.generate([GenerationRequest(hf.encode("Hello"), 4)])  # warm-up
        tokens, secs, correct = search(hf, task, problems, config)
        hf_tps = tokens / secs
        rows.append(("transformers (in-process)", tokens, secs, f"{correct}/{len(problems)} correct"))
        print(f"transformers: {tokens} tokens in {secs:.1f}s", file=sys.stderr, flush=True)
        del hf

    with LlamaServer(gguf, slots=args.slots, threads=args.threads, batch=args.batch) as server:
        served = ServedBackend.connect(f"server+llamacpp:{server.url}?tokenizer=smollm2")
        served.generate([GenerationRequest(served.encode("Hello"), 4)])
        tokens, secs, correct = search(served, task, problems, config)
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

    print(f"{len(problems)} {'mgsm' if data else 'demo'} problems · mcts ministep:32 "
          f"k={args.children} budget {args.budget} rollout<={args.rollout} · SmolLM2-135M Q4_1 GGUF · "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':<44}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}  note")
    for name, t, s, note in rows:
        print(f"{name:<44}{t:>8}{s:>10.1f}{t / s:>10.1f}  {note}")
    print(f"top5_logprob_cost (n_probs 5 time / n_probs 0 time, per token): "
          f"{(with_s / with_t) / (without_s / without_t):.3f}")
    if hf_tps is not None:
        print(f"server_vs_hf_throughput: {server_tps / hf_tps:.3f}")


if __name__ == "__main__":
    main()
