"""vLLM's offline engine in this process: ``--model vllm:MODEL``.

Requests go in as ``TokensPrompt`` (prefixes stay token ids) with ``SamplingParams`` built by the same
mapping as the vLLM server client (:func:`marco.llm.engine_map.vllm_sampling_kwargs`: one engine request per
sample with its derived seed, ``logprobs=5``, stop strings kept in the output). The engine runs with
``logprobs_mode="raw_logprobs"`` (log-softmax of the model's logits, before temperature and top-p) and
prefix caching on. ``generate_continuous`` drives the engine's ``add_request``/``step`` loop itself: a request
whose last sample finishes is handed back at once and the requests that come back join the running batch,
which is vLLM's continuous batching with the search in the loop.

vLLM starts its engine core as a child process: :meth:`VLLMBackend.close` (also run at interpreter exit)
shuts it down, so a command that used the engine exits when it is done. Where vLLM is not importable in
this process but a vLLM environment is installed (``make install`` makes ``.venv-vllm`` on CPU machines,
``$MARCO_VLLM_PYTHON`` names another), ``vllm:MODEL`` starts vLLM's OpenAI-compatible server from it on a
loopback port instead (:mod:`marco.llm.vllm_server`) and talks to it like ``server+vllm:``.
Engine settings: :class:`VLLMSettings` (environment ``MARCO_VLLM_*``, docs/engines.md).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from marco.llm.base import Generation, GenerationRequest
from marco.llm.engine_map import (
    CodecBackend,
    RequestAssembler,
    SampleJob,
    SampleOutput,
    TextCodec,
    from_logprob_dicts,
    normalise_finish,
    vllm_sampling_kwargs,
)

BUNDLED = "smollm2"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AMX or AVX512-BF16); elsewhere vLLM's CPU
    backend falls back from oneDNN to a slow torch path for bfloat16."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_id_list(ids: Sequence[int]) -> str:
    """CPU ids as vLLM's thread-binding list: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


@dataclass
class VLLMSettings:
    """How Marco starts vLLM (offline engine and managed server alike).

    - ``dtype``: ``auto`` = bfloat16 on a GPU or a CPU with AMX/AVX512-BF16, float32 on other CPUs
      (``MARCO_VLLM_DTYPE``);
    - ``block_size``: KV block in tokens; prefix caching shares whole blocks only, and the CPU default (128)
      shares sibling expansions in 128-token chunks, so 32 (``MARCO_VLLM_BLOCK_SIZE``);
    - ``kv_gib``: THE KV-cache setting, GiB (``MARCO_VLLM_KV_GIB``; default 1 on CPU, where it becomes
      ``VLLM_CPU_KVCACHE_SPACE`` since vLLM's default share of memory aborts on a 24 GiB machine; on a GPU
      ``kv_cache_memory_bytes``, unset = vLLM's ``gpu_memory_utilization``);
    - ``max_rows``: sequences in flight (``max_num_seqs``; default the backend's ``max_batch_rows``);
    - ``max_model_len``: context per sequence (``MARCO_VLLM_MAX_LEN``, default 4096: a search's prompt plus
      its deepest path);
    - ``enforce_eager``: no torch.compile/CUDA graphs (default on CPU: compiling costs minutes here);
    - ``cpu_threads``: the CPUs vLLM's CPU worker binds its compute threads to (``MARCO_VLLM_CPU_THREADS``):
      ``auto`` (default) vLLM's own choice, which keeps one core free for its API server and engine core,
      ``all`` every CPU this process may run on, or a list such as ``0-3``. On 2 cores ``all`` ran the MCTS
      batch 1.6x faster (277 against 170 tokens/s); it is opt-in because the real-engine tests were last run
      with vLLM's own binding (docs/engines.md). An explicit ``VLLM_CPU_OMP_THREADS_BIND`` wins when
      ``MARCO_VLLM_CPU_THREADS`` is unset.

    On CPU chunked prefill is off: vLLM 0.32's CPU worker crashes ("CPU Generator does not use offset", in
    ``_bookkeeping_sync``) when a seeded request's prompt is split across steps, and every Marco sample is
    seeded. It happened at 32 problems x 3 samples (prompts past the step's token budget); vLLM warns that
    SmolLM2 does not officially support disabling it, and the real-engine tests check the outputs.
    """

    dtype: str = "auto"
    block_size: int = 32
    kv_gib: float | None = None
    max_rows: int = 64
    max_model_len: int = 4096
    enforce_eager: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_threads: str = "auto"

    @classmethod
    def from_env(cls, max_rows: int = 64, env: Mapping[str, str] | None = None) -> "VLLMSettings":
        env = os.environ if env is None else env
        kv = env.get("MARCO_VLLM_KV_GIB")
        return cls(
            dtype=env.get("MARCO_VLLM_DTYPE", "auto"),
            block_size=int(env.get("MARCO_VLLM_BLOCK_SIZE", "32")),
            kv_gib=float(kv) if kv else None,
            max_rows=int(env.get("MARCO_VLLM_MAX_ROWS", str(max_rows))),
            max_model_len=int(env.get("MARCO_VLLM_MAX_LEN", "4096")),
            cpu_threads=env.get("MARCO_VLLM_CPU_THREADS") or env.get("VLLM_CPU_OMP_THREADS_BIND") or "auto",
        )

    def resolved(self, gpu: bool | None = None) -> "VLLMSettings":
        """Defaults filled in for this machine."""
        gpu = on_gpu() if gpu is None else gpu
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if gpu or cpu_has_bf16() else "float32"
        kv = self.kv_gib if self.kv_gib is not None or gpu else 1.0
        eager = self.enforce_eager if self.enforce_eager is not None else not gpu
        return VLLMSettings(dtype, self.block_size, kv, self.max_rows, self.max_model_len, eager, dict(self.extra),
                            self.cpu_threads)

    def env(self, gpu: bool = False) -> dict[str, str]:
        """Environment the engine process needs (vLLM's CPU backend reads its KV space and its thread binding
        from it)."""
        if gpu:
            return {}
        out = {} if self.kv_gib is None else {"VLLM_CPU_KVCACHE_SPACE": f"{self.kv_gib:g}"}
        if self.cpu_threads == "all":
            out["VLLM_CPU_OMP_THREADS_BIND"] = cpu_id_list(sorted(os.sched_getaffinity(0)))
        elif self.cpu_threads != "auto":
            out["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_threads
        return out

    def engine_kwargs(self, gpu: bool = False) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            dtype=self.dtype, block_size=self.block_size, max_num_seqs=self.max_rows,
            max_model_len=self.max_model_len, enforce_eager=bool(self.enforce_eager),
            enable_prefix_caching=True, logprobs_mode="raw_logprobs", max_logprobs=5,
        )
        if gpu and self.kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_gib * 2**30)
        if not gpu:
            kwargs["enable_chunked_prefill"] = False
        return {**kwargs, **self.extra}

    def server_args(self, gpu: bool = False) -> list[str]:
        """The same settings as ``vllm serve`` flags."""
        args = []
        for key, value in self.engine_kwargs(gpu).items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag if key != "enable_prefix_caching" else "--enable-prefix-caching")
            elif value is False:
                if key == "enable_chunked_prefill":  # on by default in vLLM: say it
                    args.append("--no-enable-chunked-prefill")
                continue
            else:
                args += [flag, str(value)]
        return args


def resolve_model(model: str) -> str:
    """``smollm2`` (the bundled GGUF, which vLLM cannot read) becomes its cached safetensors export; anything
    else (a model folder, a hub id) is passed on as it is."""
    from marco.llm.export import local_model

    return local_model(model) if model == BUNDLED else model


def vllm_available() -> str | None:
    """None when vLLM can be imported, else why not (tests skip with this reason)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/driver error raised at import
        return f"vLLM is not importable here ({type(exc).__name__}: {exc}); install the gpu extra on a GPU machine"
    return None


def output_to_sample(output: Any, where: str = "vLLM engine") -> SampleOutput:
    """A ``vllm.CompletionOutput`` (``token_ids``, ``logprobs`` as ``[{id: Logprob}]``, ``finish_reason``)
    in Marco's terms. ``Logprob`` objects and plain floats are both accepted."""
    positions: list[Mapping[int, float]] = [
        {int(tid): float(getattr(lp, "logprob", lp)) for tid, lp in pos.items()} for pos in (output.logprobs or [])
    ]
    return from_logprob_dicts(list(output.token_ids), positions, normalise_finish(output.finish_reason), where)


class VLLMBackend(CodecBackend):
    """A :class:`~marco.llm.base.Backend` over ``vllm.LLMEngine``."""

    uses_vllm_engine = True  # worker memory guard: never a transformers model beside it by accident

    def __init__(self, engine: Any, codec: TextCodec, name: str, make_params: Callable[..., Any],
                 make_prompt: Callable[..., Any]) -> None:
        self.engine = engine
        self.codec = codec
        self.name = name
        self._params = make_params
        self._prompt = make_prompt
        self._counter = 0

    @classmethod
    def load(cls, model: str, name: str | None = None, max_batch_rows: int = 64,
             settings: VLLMSettings | None = None, **engine_kwargs: Any) -> "VLLMBackend":
        reason = vllm_available()
        if reason is not None:
            raise RuntimeError(reason)
        gpu = on_gpu()
        settings = (settings or VLLMSettings.from_env(max_batch_rows)).resolved(gpu)
        os.environ.update(settings.env(gpu))
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the command's (--json)
        from vllm import EngineArgs, LLMEngine, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        path = resolve_model(model)
        args = EngineArgs(model=path, **{**settings.engine_kwargs(gpu), **engine_kwargs})
        engine = LLMEngine.from_engine_args(args)

        def make_params(**kwargs: Any) -> Any:
            return SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kwargs)

        backend = cls(engine, TextCodec(engine.get_tokenizer()), name or f"vllm:{model}", make_params,
                      lambda ids: TokensPrompt(prompt_token_ids=ids))
        atexit.register(backend.close)  # the engine core is a child process: never leave it behind
        return backend

    def close(self) -> None:
        """Shut the engine core (a child process) down; the backend cannot generate afterwards."""
        engine, self.engine = self.engine, None
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    # generation
    def generate_continuous(
        self,
        requests: Sequence[GenerationRequest],
        refill: Callable[[list[tuple[int, list[Generation]]]], Sequence[GenerationRequest]],
    ) -> None:
        """Run the engine's step loop; each request goes to ``refill`` as soon as its last sample finished and
        what ``refill`` returns is added to the running batch (ids continue from ``len(requests)``)."""
        assembler = RequestAssembler(self.codec.decode)
        jobs: dict[str, SampleJob] = {}
        next_id = 0

        def add(batch: Sequence[GenerationRequest]) -> None:
            nonlocal next_id
            for req in batch:
                for job in assembler.add_request(next_id, req):
                    self._counter += 1
                    key = f"marco-{self._counter}-{job.key}"
                    jobs[key] = job
                    self.engine.add_request(key, self._prompt(list(req.prompt_ids)), self._params(**vllm_sampling_kwargs(job)))
                next_id += 1

        add(requests)
        while jobs:
            completed: list[tuple[int, list[Generation]]] = []
            for ro in self.engine.step():
                if not ro.finished or ro.request_id not in jobs:
                    continue
                job = jobs.pop(ro.request_id)
                gens = assembler.done(job, output_to_sample(ro.outputs[0]))
                if gens is not None:
                    completed.append((job.rid, gens))
            if completed:
                add(list(refill(completed)))
