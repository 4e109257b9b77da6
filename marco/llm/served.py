"""Served models: a backend that sends generation requests to a running inference server.

Spec (``--model``)::

    server[+KIND]:http://HOST:PORT[/v1][?OPTION=VALUE&...][#MODEL-NAME]

``KIND`` is ``llamacpp``, ``vllm``, ``sglang`` or ``openai``; without it the server is asked what it is
(``/props`` answers on llama.cpp, ``/get_model_info`` on SGLang, ``/v1/models`` owned by ``vllm`` on vLLM).
``MODEL-NAME`` is the served model's name for OpenAI-style servers (default: the first of ``/v1/models``).
Options: ``tokenizer=SPEC`` (the model's tokenizer from local files: ``smollm2``, a ``.gguf`` path, a model
directory or a cached hub id; default: found from what the server reports it loaded), ``concurrency=N``
(requests in flight at once, default 64), ``timeout=S`` (seconds one request may take, default 600),
``retries=N`` (on connection errors and 5xx, default 5), ``original_logprobs=1`` (SGLang only: the server
runs with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``).

What each kind is asked (all with token-id prompts, the chosen token's and the top-5 raw log-probabilities per
position, a per-sample seed, stop strings kept in the output):

- ``llamacpp``: native ``/completion`` with ``n_probs: 5``, ``post_sampling_probs: false`` (log-probabilities
  of the model's softmax, before temperature and top-p) and ``return_tokens``; the sampler chain is pinned to
  temperature then top-p (llama.cpp's default chain also applies top-k 40 and min-p 0.05). Positions whose
  probabilities llama.cpp drops (a stop string's tokens, a token ending inside a UTF-8 character) are asked
  again, one short request each (see :class:`LlamaCppProtocol`).
- ``vllm`` / ``openai``: ``/v1/completions`` with ``logprobs: 5``, ``return_tokens_as_token_ids``,
  ``include_stop_str_in_output``, ``seed``. vLLM's log-probabilities are raw under its default
  ``--logprobs-mode raw_logprobs``. A server that does not return token ids is refused (text cannot be
  re-tokenised faithfully).
- ``sglang``: native ``/generate`` with ``input_ids``, ``return_logprob``, ``top_logprobs_num: 5``,
  ``no_stop_trim``. SGLang's log-probabilities are taken after temperature scaling unless the server runs
  with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``; without ``original_logprobs=1`` a sampled request at a
  temperature other than 1 is refused with that instruction (greedy and temperature 1 are raw either way).

Every request of a round is in flight at once (a thread pool over one keep-alive HTTP client, bounded by
``concurrency``), so a lockstep round is one wide batch on the server, and ``generate_continuous`` hands each
request back the moment its last sample arrives.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx

from marco.llm.base import TOP_K_LOGPROBS, Generation, GenerationRequest
from marco.llm.engine_map import (
    CodecBackend,
    EngineProtocolError,
    RequestAssembler,
    SampleJob,
    SampleOutput,
    TextCodec,
    from_logprob_dicts,
    normalise_finish,
    top_k,
    vllm_sampling_kwargs,
)

log = logging.getLogger(__name__)

SERVER_PREFIX = "server"
SERVER_ENV = "MARCO_MODEL_SERVER"  # a worker's default model server (a full spec, or just the URL)
KINDS = ("llamacpp", "vllm", "sglang", "openai")


class ServerUnavailable(ConnectionError):
    """The model server does not answer (down, restarting, overloaded past the retries).

    A :class:`ConnectionError`, so a queued job that meets it is retried with backoff rather than failed.
    """


@dataclass(frozen=True)
class ServerSpec:
    """A parsed ``server[+KIND]:URL`` spec (see the module docstring)."""

    url: str  # the server's root, without a trailing /v1
    kind: str | None = None
    model: str | None = None
    tokenizer: str | None = None
    concurrency: int = 64
    timeout_s: float = 600.0
    retries: int = 5
    original_logprobs: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "ServerSpec":
        head, sep, rest = spec.partition(":")
        if not sep or not (head == SERVER_PREFIX or head.startswith(SERVER_PREFIX + "+")):
            raise ValueError(f"{spec!r} is not a server spec: write server[+KIND]:http://HOST:PORT[/v1][#MODEL]")
        kind = head[len(SERVER_PREFIX) + 1 :] or None
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown server kind {kind!r} in {spec!r}: use one of {', '.join(KINDS)}")
        parts = urlsplit(rest)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{spec!r}: the server address must be an http(s) URL such as http://127.0.0.1:8080")
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        opts = dict(parse_qsl(parts.query))
        known = {"tokenizer", "concurrency", "timeout", "retries", "original_logprobs"}
        try:
            return cls(
                url=urlunsplit((parts.scheme, parts.netloc, path, "", "")),
                kind=kind,
                model=parts.fragment or None,
                tokenizer=opts.get("tokenizer"),
                concurrency=int(opts.get("concurrency", 64)),
                timeout_s=float(opts.get("timeout", 600)),
                retries=int(opts.get("retries", 5)),
                original_logprobs=opts.get("original_logprobs", "0") in ("1", "true", "yes"),
                extra={k: v for k, v in opts.items() if k not in known},
            )
        except ValueError as exc:
            raise ValueError(f"{spec!r}: bad option value ({exc})") from None


def server_spec_from_env(value: str) -> str:
    """``$MARCO_MODEL_SERVER`` as a spec: a full ``server...:`` spec, or a bare URL (kind detected)."""
    value = value.strip()
    return value if value.startswith(SERVER_PREFIX) else f"{SERVER_PREFIX}:{value}"


# ----------------------------------------------------------------------------------------------- protocols
class Protocol:
    """How one kind of server is asked for a sample and how its answer is read."""

    kind = ""
    path = ""

    def __init__(self, spec: ServerSpec, model: str | None) -> None:
        self.spec = spec
        self.model = model

    def payload(self, job: SampleJob) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, body: Any, job: SampleJob) -> SampleOutput:
        raise NotImplementedError

    def where(self) -> str:
        return f"{self.kind} server at {self.spec.url}"


class LlamaCppProtocol(Protocol):
    """llama.cpp's native ``/completion`` (field names as in its ``tools/server`` sources).

    ``return_tokens`` lists every generated token, but llama.cpp keeps no probabilities for two kinds of
    position: a token that leaves the text inside an unfinished UTF-8 character (a byte piece of a Chinese
    character, say), and the tokens of a stop string (its final answer drops them). Those positions are
    asked again, one request each: the prefix up to the position, one token forced to a plain ASCII one
    by ``logit_bias`` (so llama.cpp keeps that position's probabilities; the bias acts on the sampler, not on
    the reported raw probabilities), ``n_probs`` 5, or the whole vocabulary when the generated token is not
    among the top 5.
    """

    kind = "llamacpp"
    path = "/completion"

    def payload(self, job: SampleJob) -> dict[str, Any]:
        r = job.request
        return {
            "prompt": list(r.prompt_ids),
            "n_predict": r.max_new_tokens,
            "temperature": max(r.temperature, 0.0),
            "top_p": r.top_p,
            "samplers": ["temperature", "top_p"],  # not llama.cpp's default chain (top-k 40, min-p 0.05, ...)
            "top_k": 0,
            "min_p": 0.0,
            "seed": job.seed,
            "stop": list(r.stop),
            "ignore_eos": r.ignore_eos,
            "n_probs": TOP_K_LOGPROBS,
            "post_sampling_probs": False,
            "return_tokens": True,
            "cache_prompt": True,
            "stream": False,
        }

    def parse(self, body: Any, job: SampleJob) -> SampleOutput:
        """Tokens and the positions llama.cpp kept probabilities for; the others are filled by ``complete``."""
        where = self.where()
        if not isinstance(body, dict) or "tokens" not in body:
            raise EngineProtocolError(f"{where}: /completion answered without tokens (is return_tokens supported?)")
        tokens = [int(t) for t in body["tokens"]]
        entries = body.get("completion_probabilities") or []
        if tokens and not entries:
            raise EngineProtocolError(f"{where}: /completion answered without log-probabilities")
        out = SampleOutput(tokens, [], [], [], normalise_finish(body.get("stop_type")))
        out.gaps = self._align(tokens, entries, out)
        return out

    def _align(self, tokens: list[int], entries: list[dict[str, Any]], out: SampleOutput) -> list[int]:
        """Match llama.cpp's probability entries to token positions; the positions without one."""
        lps: list[float | None] = [None] * len(tokens)
        aligned = len(entries) == len(tokens)  # the common case: nothing dropped, no need to look at the text
        tops: list[tuple[list[int], list[float]] | None] = [None] * len(tokens)
        j = 0
        for i, tok in enumerate(tokens):
            if j < len(entries) and int(entries[j]["id"]) == tok and (aligned or not self._unfinished(tokens, i)):
                lps[i] = float(entries[j]["logprob"])
                tops[i] = top_k((int(c["id"]), float(c["logprob"])) for c in entries[j]["top_logprobs"])
                j += 1
        if j != len(entries):
            raise EngineProtocolError(f"{self.where()}: {len(entries)} probability entries do not match {len(tokens)} tokens")
        gaps = [i for i, lp in enumerate(lps) if lp is None]
        out.logprobs = lps  # type: ignore[assignment]
        out.top_ids = [t[0] if t else [] for t in tops]
        out.top_logprobs = [t[1] if t else [] for t in tops]
        return gaps

    decode_bytes: Callable[[Sequence[int]], str] | None = None

    def _unfinished(self, tokens: list[int], i: int) -> bool:
        """Whether the text of ``tokens[: i + 1]`` ends inside a UTF-8 character (llama.cpp then keeps no
        probabilities for token ``i``)."""
        if self.decode_bytes is None:
            return False
        return self.decode_bytes(tokens[: i + 1]).endswith("\ufffd")

    def fill_payload(self, job: SampleJob, prefix: list[int], n_probs: int, plain_token: int) -> dict[str, Any]:
        return {
            "prompt": list(job.request.prompt_ids) + prefix, "n_predict": 1, "temperature": 0.0,
            "logit_bias": [[plain_token, 100.0]], "n_probs": n_probs, "post_sampling_probs": False,
            "return_tokens": True, "cache_prompt": True, "stream": False,
        }


class OpenAIProtocol(Protocol):
    """``/v1/completions`` as vLLM serves it (token-id prompts, token ids back through its extras)."""

    kind = "openai"
    path = "/v1/completions"

    def payload(self, job: SampleJob) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": list(job.request.prompt_ids),
            "echo": False,
            "stream": False,
            "return_tokens_as_token_ids": True,  # vLLM extra: ids, not text, in the log-probabilities
            **vllm_sampling_kwargs(job),
        }
        if self.model:
            body["model"] = self.model
        return body

    def parse(self, body: Any, job: SampleJob) -> SampleOutput:
        where = self.where()
        try:
            choice = body["choices"][0]
            lp = choice["logprobs"]
            tokens, chosen_lps, tops = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise EngineProtocolError(f"{where}: /v1/completions answered without log-probabilities") from None
        ids = [_token_id(t, where) for t in tokens]
        positions: list[dict[int, float]] = []
        for tok, chosen, top in zip(ids, chosen_lps, tops):
            pos = {_token_id(k, where): float(v) for k, v in (top or {}).items()}
            pos[tok] = float(chosen)
            positions.append(pos)
        return from_logprob_dicts(ids, positions, normalise_finish(choice.get("finish_reason")), where)


class VLLMProtocol(OpenAIProtocol):
    kind = "vllm"


def _token_id(token: str, where: str) -> int:
    if isinstance(token, str) and token.startswith("token_id:"):
        return int(token[len("token_id:") :])
    raise EngineProtocolError(
        f"{where} returns tokens as text ({token!r}), not ids: Marco needs vLLM's return_tokens_as_token_ids "
        "(use a vLLM server, or name the kind: server+llamacpp:, server+sglang:)"
    )


class SGLangProtocol(Protocol):
    """SGLang's native ``/generate``."""

    kind = "sglang"
    path = "/generate"

    def payload(self, job: SampleJob) -> dict[str, Any]:
        r = job.request
        if 0 < r.temperature != 1.0 and not self.spec.original_logprobs:
            raise EngineProtocolError(
                f"{self.where()}: SGLang returns log-probabilities after temperature {r.temperature}; start the "
                "server with SGLANG_RETURN_ORIGINAL_LOGPROB=1 and add ?original_logprobs=1 to the spec"
            )
        return {
            "input_ids": list(r.prompt_ids),
            "sampling_params": {
                "max_new_tokens": r.max_new_tokens,
                "temperature": max(r.temperature, 0.0),
                "top_p": r.top_p,
                "stop": list(r.stop),
                "no_stop_trim": True,
                "ignore_eos": r.ignore_eos,
                "skip_special_tokens": False,
                "sampling_seed": job.seed,
            },
            "return_logprob": True,
            "top_logprobs_num": TOP_K_LOGPROBS,
            "logprob_start_len": -1,
        }

    def parse(self, body: Any, job: SampleJob) -> SampleOutput:
        where = self.where()
        try:
            meta = body["meta_info"]
            chosen = meta["output_token_logprobs"]
            tops = meta["output_top_logprobs"]
        except (KeyError, TypeError):
            raise EngineProtocolError(f"{where}: /generate answered without log-probabilities") from None
        ids = [int(c[1]) for c in chosen]
        positions: list[dict[int, float]] = []
        for c, top in zip(chosen, tops):
            pos = {int(t[1]): float(t[0]) for t in top}
            pos[int(c[1])] = float(c[0])
            positions.append(pos)
        finish = meta.get("finish_reason") or {}
        reason = finish.get("type") if isinstance(finish, dict) else finish
        return from_logprob_dicts(ids, positions, normalise_finish(reason), where)


PROTOCOLS: dict[str, type[Protocol]] = {
    "llamacpp": LlamaCppProtocol, "vllm": VLLMProtocol, "openai": OpenAIProtocol, "sglang": SGLangProtocol,
}


# ------------------------------------------------------------------------------------------------- client
class ServerClient:
    """One keep-alive HTTP client to a model server, with retries and errors that name the server."""

    RETRY_STATUS = {500, 502, 503, 504}

    def __init__(self, spec: ServerSpec, transport: httpx.BaseTransport | None = None) -> None:
        self.spec = spec
        limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
        timeout = httpx.Timeout(spec.timeout_s, connect=10.0)
        self.http = httpx.Client(base_url=spec.url, limits=limits, timeout=timeout, transport=transport)
        self.backoff_s = 0.5

    def close(self) -> None:
        self.http.close()

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        delay = self.backoff_s
        last: Exception | None = None
        for attempt in range(self.spec.retries + 1):
            try:
                return call()
            except (httpx.TransportError, _Retryable) as exc:  # connection refused/reset, timeouts, 5xx
                last = exc
                if attempt == self.spec.retries:
                    break
                log.warning("model server %s: %s failed (%s); retry %d in %.1fs", self.spec.url, what, exc, attempt + 1, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise ServerUnavailable(
            f"model server at {self.spec.url} does not answer {what} after {self.spec.retries + 1} attempts "
            f"({type(last).__name__}: {last}); is it running? (start it, or fix --model / ${SERVER_ENV})"
        )

    def _check(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code in self.RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code >= 400:
            raise EngineProtocolError(
                f"model server at {self.spec.url} refused {what} with HTTP {resp.status_code}: {resp.text[:300]}"
            )
        return resp

    def get_json(self, path: str) -> Any | None:
        """GET ``path``; None when the server does not have it (404/405), so probing tells kinds apart."""

        def call() -> Any:
            resp = self.http.get(path, timeout=10.0)
            if resp.status_code in (404, 405, 400):
                return None
            self._check(resp, f"GET {path}")
            try:
                return resp.json()
            except ValueError:
                return None

        return self._retrying(f"GET {path}", call)

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        def call() -> Any:
            resp = self._check(self.http.post(path, json=body), f"POST {path}")
            try:
                return resp.json()
            except ValueError:
                raise EngineProtocolError(f"model server at {self.spec.url}: POST {path} did not answer JSON") from None

        return self._retrying(f"POST {path}", call)

    def detect(self) -> tuple[str, Any]:
        """The server's kind and what it says about itself (raises a clear error when it is none we know)."""
        props = self.get_json("/props")
        if isinstance(props, dict) and ("default_generation_settings" in props or "build_info" in props):
            return "llamacpp", props
        info = self.get_json("/get_model_info")
        if isinstance(info, dict) and "model_path" in info:
            return "sglang", info
        models = self.get_json("/v1/models")
        if isinstance(models, dict) and models.get("data"):
            owner = str(models["data"][0].get("owned_by", ""))
            return ("vllm" if owner == "vllm" else "openai"), models
        raise EngineProtocolError(
            f"the server at {self.spec.url} answers, but not as llama.cpp (/props), SGLang (/get_model_info) or an "
            "OpenAI-compatible server (/v1/models): check the address, or name the kind (server+vllm:...)"
        )


class _Retryable(Exception):
    """A 5xx answer: worth another try."""


# ------------------------------------------------------------------------------------------------ backend
class ServedBackend(CodecBackend):
    """A :class:`~marco.llm.base.Backend` whose model runs in a server (see the module docstring)."""

    def __init__(
        self, spec: ServerSpec, protocol: Protocol, codec: TextCodec, client: ServerClient, name: str
    ) -> None:
        self.spec = spec
        self.protocol = protocol
        self.codec = codec
        self.client = client
        self.name = name
        self.kind = protocol.kind
        if isinstance(protocol, LlamaCppProtocol):
            protocol.decode_bytes = codec.decode
        self._pool = ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix="marco-served")

    @classmethod
    def connect(cls, spec_text: str, transport: httpx.BaseTransport | None = None) -> "ServedBackend":
        """Parse ``spec_text``, ask the server what it is, and load the model's tokenizer."""
        spec = ServerSpec.parse(spec_text)
        client = ServerClient(spec, transport=transport)
        client.get_json("/health")  # fail now, naming the server, when it is down (a 404 is fine)
        kind, about = spec.kind, None
        if kind is None or spec.tokenizer is None or (kind in ("vllm", "openai") and not spec.model):
            detected, about = client.detect()
            kind = kind or detected
        model = spec.model
        if kind in ("vllm", "openai") and not model and isinstance(about, dict) and about.get("data"):
            model = str(about["data"][0]["id"])
        protocol = PROTOCOLS[kind](spec, model)
        source = spec.tokenizer or _tokenizer_from(kind, about, spec)
        try:
            codec = TextCodec.load(source)
        except OSError as exc:
            raise EngineProtocolError(
                f"no local tokenizer files for {source!r} (the model served at {spec.url}): put them here, or add "
                f"?tokenizer=SPEC to the spec ({str(exc).splitlines()[0]})"
            ) from None
        return cls(spec, protocol, codec, client, name=spec_text)

    # generation
    def _one(self, job: SampleJob) -> SampleOutput:
        body = self.protocol.payload(job)
        out = self.protocol.parse(self.client.post_json(self.protocol.path, body), job)
        if out.gaps:
            self._fill(job, out, out.gaps)
            out.gaps = []
        out.check(self.protocol.where())
        return out

    def _fill(self, job: SampleJob, out: SampleOutput, gaps: list[int]) -> None:
        """Ask llama.cpp for the probabilities of the positions it did not keep (see LlamaCppProtocol)."""
        proto = self.protocol
        assert isinstance(proto, LlamaCppProtocol)
        plain = self.codec.encode("a")[0]
        for i in gaps:
            tok = out.token_ids[i]
            for attempt in range(2):  # the top 5, then (the generated token ranks lower) the whole vocabulary
                n_probs = TOP_K_LOGPROBS if attempt == 0 else self.vocab_size
                body = self.client.post_json(proto.path, proto.fill_payload(job, out.token_ids[:i], n_probs, plain))
                entries = body.get("completion_probabilities") or []
                if not entries:
                    raise EngineProtocolError(f"{proto.where()}: no probabilities for position {i} when asked again")
                cands = {int(c["id"]): float(c["logprob"]) for c in entries[0]["top_logprobs"]}
                if tok in cands:
                    break
            else:
                raise EngineProtocolError(f"{proto.where()}: token {tok} is not in the vocabulary's probabilities")
            out.logprobs[i] = cands[tok]
            ids, lps = top_k(cands.items())
            out.top_ids[i], out.top_logprobs[i] = ids, lps

    @property
    def vocab_size(self) -> int:
        return len(self.codec.tokenizer)  # type: ignore[arg-type]

    def generate_continuous(
        self,
        requests: Sequence[GenerationRequest],
        refill: Callable[[list[tuple[int, list[Generation]]]], Sequence[GenerationRequest]],
    ) -> None:
        """Every sample in flight at once; each request goes to ``refill`` as soon as its last sample is back,
        and the requests ``refill`` returns are sent at once (ids continue from ``len(requests)``)."""
        assembler = RequestAssembler(self.codec.decode)
        pending: dict[Future[SampleOutput], SampleJob] = {}
        next_id = 0

        def submit(batch: Sequence[GenerationRequest]) -> None:
            nonlocal next_id
            for req in batch:
                for job in assembler.add_request(next_id, req):
                    self.protocol.payload(job)  # refuse what the server cannot answer before sending anything
                    pending[self._pool.submit(self._one, job)] = job
                next_id += 1

        try:
            submit(requests)
            while pending:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                completed: list[tuple[int, list[Generation]]] = []
                for fut in finished:
                    job = pending.pop(fut)
                    gens = assembler.done(job, fut.result())
                    if gens is not None:
                        completed.append((job.rid, gens))
                if completed:
                    submit(list(refill(completed)))
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _tokenizer_from(kind: str, about: Any, spec: ServerSpec) -> str:
    """The tokenizer spec of what the server says it loaded, when those files are on this machine."""
    candidates: list[str] = []
    if isinstance(about, dict):
        if kind == "llamacpp":
            candidates.append(str(about.get("model_path", "")))
        elif kind == "sglang":
            candidates.extend([str(about.get("tokenizer_path", "")), str(about.get("model_path", ""))])
        else:
            for m in about.get("data", [])[:1]:
                candidates.extend([str(m.get("root", "")), str(m.get("id", ""))])
    for c in candidates:
        if c and (os.path.exists(c) or (kind not in ("llamacpp",) and c.count("/") == 1)):
            return c
    raise EngineProtocolError(
        f"cannot find the tokenizer of the model served at {spec.url} (it reports {candidates or 'nothing'}): "
        "add ?tokenizer=SPEC to the spec (smollm2, a .gguf file, a model directory or a cached hub id)"
    )
