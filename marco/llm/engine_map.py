"""Mapping between Marco's generation requests and serving engines (llama.cpp, vLLM, SGLang, OpenAI).

Shared by the served-model client (:mod:`marco.llm.served`) and the vLLM offline engine
(:mod:`marco.llm.vllm_engine`), so both turn requests into engine calls and engine answers into
:class:`~marco.llm.base.Generation` objects the same way:

- a request with ``n`` samples becomes ``n`` engine requests of one sample each, sample ``j`` seeded with
  :func:`sample_seed` ``(seed, j)``: a sample never depends on ``n`` or on the other requests in flight, the
  same guarantee the transformers backend gives. Greedy requests are sent once and the answer copied;
- every answer becomes a :class:`SampleOutput` (generated ids, the chosen tokens' log-probabilities, the top-5
  ids and log-probabilities per position, a finish reason), then a ``Generation`` whose text is the local
  tokenizer's decoding of the ids (special tokens kept, like the transformers backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from marco.llm.base import TOP_K_LOGPROBS, Generation, GenerationRequest

SEED_MODULUS = 2**31 - 1  # llama.cpp takes a uint32 seed, vLLM and SGLang an int: stay inside all of them


def sample_seed(seed: int, sample: int) -> int:
    """The engine seed of sample ``sample`` of a request seeded ``seed`` (the same pair, the same seed)."""
    return (seed * 1_000_003 + sample * 7_919 + 12_345) % SEED_MODULUS


@dataclass(frozen=True)
class SampleJob:
    """One engine request: sample ``sample`` of request ``rid`` (greedy requests have one job for all)."""

    rid: int
    sample: int
    request: GenerationRequest

    @property
    def seed(self) -> int:
        return sample_seed(self.request.seed, self.sample)

    @property
    def key(self) -> str:
        return f"{self.rid}-{self.sample}"


def sample_jobs(rid: int, request: GenerationRequest) -> list[SampleJob]:
    """The engine requests that answer ``request``: one per sample, or one for all when greedy."""
    if request.n < 1:
        raise ValueError(f"a request asks for n={request.n} samples; n must be at least 1")
    if request.temperature <= 0:
        return [SampleJob(rid, 0, request)]
    return [SampleJob(rid, j, request) for j in range(request.n)]


@dataclass
class SampleOutput:
    """What an engine returned for one sample, in Marco's terms."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[float]]
    top_ids: list[list[int]]
    finish_reason: str
    gaps: list[int] = field(default_factory=list)  # positions the engine kept no probabilities for (to fill)

    def check(self, where: str) -> None:
        """Fail loudly when the engine's answer is not aligned (one top-5 list per generated token)."""
        n = len(self.token_ids)
        if not (len(self.logprobs) == len(self.top_logprobs) == len(self.top_ids) == n):
            raise EngineProtocolError(
                f"{where}: {n} tokens but {len(self.logprobs)} log-probabilities and {len(self.top_logprobs)} "
                "top-5 lists; the engine did not return log-probabilities for every generated token"
            )
        for k, (lps, ids) in enumerate(zip(self.top_logprobs, self.top_ids)):
            if len(lps) != TOP_K_LOGPROBS or len(ids) != TOP_K_LOGPROBS:
                raise EngineProtocolError(f"{where}: position {k} has {len(lps)} top log-probabilities, not {TOP_K_LOGPROBS}")


class EngineProtocolError(RuntimeError):
    """An engine answered in a shape Marco cannot use (wrong protocol, missing log-probabilities)."""


def top_k(candidates: Iterable[tuple[int, float]], k: int = TOP_K_LOGPROBS) -> tuple[list[int], list[float]]:
    """The ``k`` most likely ``(id, logprob)`` pairs, descending (ties broken by the smaller id).

    vLLM and OpenAI servers return the top-k *plus* the sampled token, so a position can hold ``k + 1``
    candidates; the sampled token is only in the top-k when it ranks there.
    """
    best = sorted({int(i): float(lp) for i, lp in candidates}.items(), key=lambda p: (-p[1], p[0]))[:k]
    return [i for i, _ in best], [lp for _, lp in best]


def vllm_sampling_kwargs(job: SampleJob) -> dict[str, object]:
    """vLLM's sampling parameters for ``job``: the keyword arguments of ``SamplingParams`` for the offline
    engine and the same fields of a ``/v1/completions`` body for a vLLM server."""
    r = job.request
    kwargs: dict[str, object] = {
        "n": 1,
        "seed": job.seed,
        "temperature": max(r.temperature, 0.0),
        "top_p": r.top_p,
        "max_tokens": r.max_new_tokens,
        "logprobs": TOP_K_LOGPROBS,
        "include_stop_str_in_output": True,  # the search cuts steps itself; the stop string stays in the output
        "skip_special_tokens": False,
        "ignore_eos": r.ignore_eos,
    }
    if r.stop:
        kwargs["stop"] = list(r.stop)
    return kwargs


def normalise_finish(reason: str | None, stopped_by: str | None = None) -> str:
    """Marco's finish reason: ``stop`` (a stop string or end-of-sequence) or ``length``."""
    if reason in ("length", "limit", "max_tokens"):
        return "length"
    if reason in ("stop", "eos", "word", "stop_sequence", "abort") or stopped_by:
        return "stop"
    return "length"


def from_logprob_dicts(
    token_ids: Sequence[int], positions: Sequence[Mapping[int, float]], finish_reason: str, where: str
) -> SampleOutput:
    """A sample from per-position ``{token id: logprob}`` maps that hold the top-k and the sampled token
    (vLLM's ``CompletionOutput.logprobs`` and the OpenAI server's ``token_id:N`` keyed ``top_logprobs``)."""
    chosen: list[float] = []
    tops: list[list[float]] = []
    ids: list[list[int]] = []
    for k, (tok, pos) in enumerate(zip(token_ids, positions)):
        if tok not in pos:
            raise EngineProtocolError(f"{where}: no log-probability for generated token {tok} at position {k}")
        chosen.append(float(pos[tok]))
        top_i, top_lp = top_k(pos.items())
        ids.append(top_i)
        tops.append(top_lp)
    out = SampleOutput(list(token_ids), chosen, tops, ids, finish_reason)
    out.check(where)
    return out


def to_generation(out: SampleOutput, decode: Callable[[Sequence[int]], str]) -> Generation:
    return Generation(
        token_ids=list(out.token_ids), text=decode(out.token_ids), logprobs=list(out.logprobs),
        top_logprobs=[list(t) for t in out.top_logprobs], top_ids=[list(t) for t in out.top_ids],
        finish_reason=out.finish_reason,
    )


class RequestAssembler:
    """Collects sample outputs until each request has all ``n`` of them, then yields its generations."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self._requests: dict[int, GenerationRequest] = {}
        self._have: dict[int, dict[int, SampleOutput]] = {}

    def add_request(self, rid: int, request: GenerationRequest) -> list[SampleJob]:
        self._requests[rid] = request
        self._have[rid] = {}
        return sample_jobs(rid, request)

    def done(self, job: SampleJob, out: SampleOutput) -> list[Generation] | None:
        """Record ``out``; the request's generations once its last sample arrived, else None."""
        have = self._have[job.rid]
        have[job.sample] = out
        req = self._requests[job.rid]
        jobs = 1 if req.temperature <= 0 else req.n
        if len(have) < jobs:
            return None
        del self._have[job.rid], self._requests[job.rid]
        if req.temperature <= 0:
            return [to_generation(have[0], self.decode) for _ in range(req.n)]
        return [to_generation(have[j], self.decode) for j in range(req.n)]

    @property
    def open(self) -> int:
        return len(self._requests)


class TextCodec:
    """Encode, decode and chat-template with the served model's own tokenizer (a transformers tokenizer from
    local files), exactly as the transformers backend does, so prefixes stay the same token ids."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, spec: str) -> "TextCodec":
        """The tokenizer of a model spec: ``smollm2``, a ``.gguf`` file, a model directory or a hub id already
        in the local cache (never downloaded)."""
        import os

        from transformers import AutoTokenizer

        from marco.llm.export import local_model

        kwargs: dict[str, object] = {}
        spec = local_model(spec)  # a GGUF model's cached export (marco.llm.export)
        if not os.path.isdir(spec):
            kwargs["local_files_only"] = True
        return cls(AutoTokenizer.from_pretrained(spec, **kwargs))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=False))  # type: ignore[attr-defined]

    def apply_chat_template(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
        return self.encode(str(text) + assistant_prefix)


ContinuousRefill = Callable[[list[tuple[int, list[Generation]]]], Sequence[GenerationRequest]]


def generate_all(
    generate_continuous: Callable[[Sequence[GenerationRequest], ContinuousRefill], None],
    requests: Sequence[GenerationRequest],
) -> list[list[Generation]]:
    """A plain ``generate`` on top of an engine's ``generate_continuous``: collect every request's samples,
    refill nothing."""
    out: list[list[Generation]] = [[] for _ in requests]

    def refill(done: list[tuple[int, list[Generation]]]) -> list[GenerationRequest]:
        for rid, gens in done:
            out[rid] = gens
        return []

    generate_continuous(requests, refill)
    return out


class CodecBackend:
    """Text and ``generate`` for a backend that holds a :class:`TextCodec` as ``codec`` and implements
    ``generate_continuous`` (the served client and the vLLM engine)."""

    codec: "TextCodec"

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.codec.decode(token_ids)

    def apply_chat_template(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        return self.codec.apply_chat_template(messages, assistant_prefix)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        return generate_all(self.generate_continuous, requests)  # type: ignore[attr-defined]
