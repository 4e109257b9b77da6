"""The served-model backend against a real llama.cpp server on 127.0.0.1 with the bundled SmolLM2 GGUF.

The binary is built by `make llama-server` (cached outside the clone); these tests skip, saying so, where
it is missing.

Tolerance against the transformers backend: both read the same GGUF, whose weights are Q4_1 (transformers
dequantises them to float32, so the weights are the same numbers), but llama.cpp's CPU kernels quantise the
activations to 8 bits (Q8_1 blocks) inside every quantised matmul and sum in another order; over 30 layers
that moves the logits by up to a few tenths. Measured at the same token ids (4 prompts, 189 positions):
top-5 probabilities within 0.088, confidences c_i within 0.090, a generation's mean confidence within
0.006, log-probabilities of tokens above p = 0.05 within 0.55 nats, top-1 the same at 184 of 189 positions
(the 5 others near-ties). The test asserts PROB_TOL, MEAN_CONFIDENCE_TOL, and the same top-1 where the
reference's top-2 are more than TOP1_GAP apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from marco.llm.base import GenerationRequest
from marco.llm.llamacpp_server import LlamaServer, find_llama_server
from marco.llm.served import ServedBackend
from marco.tasks.data import PACKAGED_DIR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROB_TOL = 0.12  # per position: top-5 probabilities and the confidence c_i (measured max 0.09)
MEAN_CONFIDENCE_TOL = 0.02  # a generation's mean confidence, what scores a node (measured max 0.006)
TOP1_GAP = 1.2  # nats: log-probabilities of likely tokens differ by up to ~0.55, so closer top-2 may swap
DATA = PACKAGED_DIR  # the MGSM shipped with marco: a clean clone has no ../shared
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Translate to French: The cat sleeps on the mat.",
    "A train travels 60 km in 1.5 hours. What is its speed?",
    "Janet has 16 eggs, eats 3 and bakes with 4. She sells the rest at 2 dollars each. How much does she earn?",
]
QUESTION = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]


def _gguf() -> str:
    from marco.llm.hf import smollm2_path

    return os.path.join(*smollm2_path())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if find_llama_server() is None:
        pytest.skip("no llama-server binary: run `make llama-server` (or set $MARCO_LLAMA_SERVER)")
    log = tmp_path_factory.mktemp("llama") / "server.log"
    s = LlamaServer(_gguf(), slots=8, ctx_per_slot=2048, threads=1, log_path=str(log)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def served(server) -> ServedBackend:
    b = ServedBackend.connect(f"server:{server.url}")  # kind and tokenizer found from the server's /props
    yield b
    b.close()


@pytest.fixture(scope="module")
def hf():
    """The reference in float32 whatever the CPU: the tolerances are llama.cpp's error against exact
    arithmetic (against a bfloat16 reference on an AVX512-BF16 EPYC the two errors added up to 0.13)."""
    from marco.llm import load_backend

    return load_backend("smollm2", dtype="float32")


def test_kind_and_tokenizer_are_detected(served, hf) -> None:
    assert served.kind == "llamacpp"
    prompt = served.apply_chat_template(QUESTION, "<Thought>\n")
    assert prompt == hf.apply_chat_template(QUESTION, "<Thought>\n")


def test_top5_agrees_with_transformers_at_the_same_token_ids(served, hf) -> None:
    import torch

    prompts = [served.apply_chat_template([{"role": "user", "content": q}], "<Thought>\n") for q in QUESTIONS]
    gens = [g[0] for g in served.generate([GenerationRequest(p, 64) for p in prompts])]
    worst_p = worst_c = worst_mean_c = 0.0
    positions = 0
    for prompt, gen in zip(prompts, gens):
        assert len(gen.top_ids) == len(gen.token_ids) == len(gen.logprobs) >= 8
        ids = torch.tensor([prompt + gen.token_ids[:-1]])  # teacher-forced: the same ids on both engines
        with torch.inference_mode():
            logp = torch.log_softmax(hf.model(input_ids=ids).logits[0, len(prompt) - 1 :].float(), dim=-1)
        ref_lp, ref_ids = logp.topk(5, dim=-1)
        mine_c, ref_c = [], []
        for k in range(len(gen.token_ids)):
            positions += 1
            for tid, lp in zip(gen.top_ids[k], gen.top_logprobs[k]):
                worst_p = max(worst_p, abs(math.exp(lp) - math.exp(logp[k, tid].item())))
            if ref_lp[k, 0] - ref_lp[k, 1] > TOP1_GAP:  # no near-tie: both engines rank the same token first
                assert gen.top_ids[k][0] == ref_ids[k, 0].item(), f"top-1 differs at position {k}"
            mine_c.append(math.exp(gen.logprobs[k]) / sum(math.exp(x) for x in gen.top_logprobs[k]))
            ref_c.append(math.exp(logp[k, gen.token_ids[k]].item()) / ref_lp[k].exp().sum().item())
            worst_c = max(worst_c, abs(mine_c[-1] - ref_c[-1]))
        worst_mean_c = max(worst_mean_c, abs(sum(mine_c) / len(mine_c) - sum(ref_c) / len(ref_c)))
    print(f"{positions} positions: max |dp| {worst_p:.4f}, max |dc_i| {worst_c:.4f}, max |d mean c| {worst_mean_c:.4f}")
    assert worst_p <= PROB_TOL and worst_c <= PROB_TOL and worst_mean_c <= MEAN_CONFIDENCE_TOL


def test_greedy_batch_equals_one_by_one(served) -> None:
    prompts = [served.apply_chat_template([{"role": "user", "content": q}]) for q in
               ("What is 7 times 8?", "Name a red fruit.", "Count from 1 to 5.", "What is the capital of France?")]
    together = served.generate([GenerationRequest(p, 24) for p in prompts])
    alone = [served.generate([GenerationRequest(p, 24)])[0] for p in prompts]
    assert [g[0].token_ids for g in together] == [g[0].token_ids for g in alone]
    for t, a in zip(together, alone):
        assert t[0].logprobs == pytest.approx(a[0].logprobs, abs=1e-3)


def test_stop_strings_n_and_seeds(served) -> None:
    prompt = served.apply_chat_template(QUESTION, "<Thought>\n")
    free = served.generate([GenerationRequest(prompt, 48)])[0][0]
    # stop at the first space the model writes: the text keeps it, every token keeps its log-probabilities
    stopped = served.generate([GenerationRequest(prompt, 48, stop=(" ",))])[0][0]
    assert stopped.finish_reason == "stop" and " " in stopped.text
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.top_logprobs) == len(stopped.token_ids) == len(stopped.logprobs)
    # the stop token's probabilities (dropped by llama.cpp, asked again) are those of the free run
    n = len(stopped.token_ids)
    assert stopped.top_ids == free.top_ids[:n]
    assert stopped.logprobs == pytest.approx(free.logprobs[:n], abs=1e-3)
    assert served.decode(stopped.token_ids[:-1]).count(" ") == 0  # the last token completed the stop string
    req = GenerationRequest(prompt, 16, temperature=1.0, n=3, seed=11)
    first = served.generate([req])[0]
    again = served.generate([req, GenerationRequest(prompt, 16, temperature=1.0, n=1, seed=11)])
    assert [g.token_ids for g in again[0]] == [g.token_ids for g in first]  # reproducible, in any batch
    assert again[1][0].token_ids == first[0].token_ids  # sample 0 does not depend on n
    assert len({tuple(g.token_ids) for g in first}) > 1
    other = served.generate([GenerationRequest(prompt, 16, temperature=1.0, n=3, seed=12)])[0]
    assert [g.token_ids for g in other] != [g.token_ids for g in first]


def test_marco_run_mcts_through_the_server_stores_its_nodes(server, tmp_path) -> None:
    from marco.cli import app
    from marco.search.state import MERGED, REUSED
    from marco.store import Store

    db = f"sqlite:///{tmp_path / 'run.db'}"
    out = CliRunner().invoke(app, [
        "run", "--dataset", "mgsm", "--lang", "en", "--limit", "2", "--data-dir", str(DATA), "--model",
        f"server+llamacpp:{server.url}?tokenizer=smollm2", "--strategy", "mcts", "--action", "ministep:16",
        "--budget", "96", "--children", "2", "--db", db,
    ])
    assert out.exit_code == 0, out.output
    batch_id = out.output.split("batch ", 1)[1].split()[0]
    store = Store.open(db)
    try:
        searches = store.find_searches(batch_id, limit=None)
        assert len(searches) == 2 and all(s.status == "done" and s.tokens > 0 for s in searches)
        for s in searches:
            # How many nodes a 96-token tree grows depends on what the model samples (two identical samples
            # merge; a chain may end inside its first mini-step), so assert the shape, not a count.
            tree = store.load_tree(str(s.id))
            assert tree.root.children, "the root has no action the model wrote"
            written = [n for n in tree if n.kind not in ("root", "reflection")]
            assert all(len(n.confidences) == len(n.token_ids) for n in written)
            assert all(0.0 < c <= 1.0 for n in written for c in n.confidences)
            # what the search spent: every written node once, except copies of a reused rollout (generated
            # once already), plus a merged sample's action written again
            copies = [n for n in written if n.finish_reason == REUSED or (
                n.kind == "rollout" and n.finish_reason != MERGED and tree.nodes[n.parent_id].finish_reason == REUSED)]
            merged = sum(tree.nodes[n.parent_id].num_tokens for n in tree if n.finish_reason == MERGED)
            spent = sum(n.num_tokens for n in written) - sum(n.num_tokens for n in copies) + merged
            assert 0 < spent == s.tokens <= 96
    finally:
        store.close()


# ------------------------------------------------------------------ queued batches through Celery workers
@pytest.fixture(scope="module")
def queue_env(pg_database, redis_url, server) -> dict[str, str]:
    from marco.store import Store

    url = pg_database()
    Store.open(url).close()
    return {
        "MARCO_BROKER_URL": redis_url,
        "MARCO_DATABASE_URL": url,
        "MARCO_LEASE_SECONDS": "20",
        "MARCO_DATA_DIR": str(DATA),
        "OMP_NUM_THREADS": "1",
    }


def _tiny():  # type: ignore[no-untyped-def]
    from marco.search.base import SearchConfig

    return SearchConfig(strategy="mcts", action="ministep:16", budget=64, children=2, max_depth=3, max_answer_tokens=24, seed=1)


def test_queued_batch_runs_through_the_server_and_survives_its_restart(queue_env, server, tmp_path) -> None:
    from marco.store import Store
    from marco.store.models import Job
    from scheduler.dispatch import CeleryDispatcher
    from scheduler.submit import SubmitRequest, submit
    from tests.test_queue_integration import assert_trees_complete, wait_batch
    from worker.harness import start_worker
    from worker.settings import QueueSettings

    # a server of its own (the module's one stays up for the other tests), on a port it can come back to
    own = LlamaServer(server.model, slots=4, ctx_per_slot=2048, threads=1, log_path=str(tmp_path / "own.log")).start()
    env = {**queue_env, "MARCO_MODEL_SERVER": f"server+llamacpp:{own.url}?tokenizer=smollm2&retries=1"}
    store = Store.open(env["MARCO_DATABASE_URL"])
    worker = start_worker(env, tmp_path, name="served")
    try:
        dispatcher = CeleryDispatcher(QueueSettings.from_env(env))
        plan = submit(store, dispatcher, SubmitRequest(task="mgsm", configs=[_tiny()], model="smollm2",
                                                       data_dir=str(DATA), langs=["en"], limit=2, chunk=1))
        assert wait_batch(store, plan.batch_id, 300) == "done"
        assert_trees_complete(store, plan.batch_id)
        assert all(store.count_nodes(sid) > 2 for sid in plan.search_ids)

        # the server dies mid-round: the job goes back to the queue, and completes once the server is back
        config = dataclasses.replace(_tiny(), budget=192, seed=2, max_depth=5)
        plan = submit(store, dispatcher, SubmitRequest(task="mgsm", configs=[config], model="smollm2",
                                                       data_dir=str(DATA), langs=["en"], limit=1, chunk=1))
        (job_id,), (search_id,) = plan.job_ids, plan.search_ids
        deadline = time.monotonic() + 180
        while store.count_nodes(search_id) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get_job(job_id).status == "running", store.get_job(job_id).status
        own.kill()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = store.get_job(job_id)
            if job.status == "queued" and job.error and "does not answer" in job.error:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"job not released while its server is down: {job.status} {job.error}")
        own.start()  # same port
        assert wait_batch(store, plan.batch_id, 400) == "done"
        job = store.get_job(job_id)
        assert job.status == "done" and job.attempts >= 2 and job.error is None
        assert_trees_complete(store, plan.batch_id)
        with store.sessions() as s:
            assert s.scalar(select(Job.status).where(Job.id == job_id)) == "done"
        assert "released" in worker.output()
    finally:
        worker.stop()
        own.stop()
        store.close()
