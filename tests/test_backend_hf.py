"""The transformers backend on the real SmolLM2 model (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marco.confidence import token_confidences
from marco.llm.base import GenerationRequest
from marco.search.base import SearchConfig
from marco.search.driver import LockstepDriver
from marco.tasks import get_task

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is 2 + 3?",
    "Tom has 5 apples and eats 2. How many apples are left?",
    "A box holds 6 eggs. How many eggs are in 3 boxes? Explain briefly.",
]


def prompts(backend):
    return [backend.apply_chat_template([{"role": "user", "content": q}], "<Thought>\n") for q in QUESTIONS]


def test_top5_logprobs_match_an_independent_forward_pass(smollm2):
    prompt = prompts(smollm2)[1]
    gen = smollm2.generate([GenerationRequest(prompt, 24, temperature=0.9, seed=5)])[0][0]
    assert gen.num_tokens == len(gen.logprobs) == len(gen.top_logprobs) > 0
    full = torch.tensor([prompt + gen.token_ids])
    with torch.inference_mode():
        logp = smollm2.model(full).logits[0].float().log_softmax(-1)
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + gen.num_tokens]
    top = rows.topk(5, dim=-1)
    np.testing.assert_allclose(np.array(gen.top_logprobs), top.values.numpy(), atol=2e-4)
    assert [r[0] for r in gen.top_ids] == top.indices[:, 0].tolist()
    chosen = rows.gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0].numpy()
    # raw log-probabilities: the sampling temperature (0.9) does not change them
    np.testing.assert_allclose(np.array(gen.logprobs), chosen, atol=2e-4)
    conf = token_confidences(gen.logprobs, gen.top_logprobs)
    assert all(0.0 < c <= 1.0 + 1e-9 for c in conf)


def test_greedy_batched_equals_greedy_single_and_generate(smollm2):
    ps = prompts(smollm2)
    single = [smollm2.generate([GenerationRequest(p, 32)])[0][0] for p in ps]
    batched = [g[0] for g in smollm2.generate([GenerationRequest(p, 32) for p in ps])]
    for s, b in zip(single, batched):
        assert s.token_ids == b.token_ids
    ids = torch.tensor([ps[0]])
    with torch.inference_mode():
        ref = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    ref_ids = ref[0, len(ps[0]) :].tolist()
    assert single[0].token_ids[: len(ref_ids)] == ref_ids


def test_a_sample_does_not_depend_on_its_batch_and_stop_strings_end_rows(smollm2):
    ps = prompts(smollm2)
    req = GenerationRequest(ps[1], 40, stop=("\n",), temperature=0.8, top_p=0.95, n=3, seed=11)
    alone = smollm2.generate([req])[0]
    together = smollm2.generate([GenerationRequest(ps[2], 30, temperature=0.5, seed=1), req])[1]
    assert [g.token_ids for g in alone] == [g.token_ids for g in together]
    assert len({tuple(g.token_ids) for g in alone}) > 1  # n samples differ
    for g in alone:
        assert g.finish_reason in ("stop", "length")
        if g.finish_reason == "stop" and not g.text.endswith("<|im_end|>"):
            assert g.text.endswith("\n") and "\n" not in g.text[:-1]
        if g.finish_reason == "length":
            assert g.num_tokens == 40


def test_mcts_ministep32_on_an_mgsm_problem_finishes_within_budget_with_a_scored_answer(smollm2, data_dir):
    task = get_task("mgsm")
    problem = task.load(str(data_dir), ["en"], 1)[0]
    config = SearchConfig(strategy="mcts", action="ministep:32", budget=320, children=2, max_answer_tokens=128)
    driver = LockstepDriver(smollm2, task, config)
    result = driver.run([problem])[0]
    assert 0 < result.tokens <= 320
    assert result.score is not None and result.correct in (True, False)
    assert result.answer is not None
    ministeps = [n for n in result.tree if n.kind == "ministep"]
    assert ministeps and all(n.num_tokens == 32 for n in ministeps if any(c.kind == "rollout" for c in n.children))
    assert len(driver.stats.widths) >= result.rounds  # one batch handed out per round of the search


@pytest.mark.parametrize("join", ["fed", "prefilled"])
def test_prefix_cache_reuses_prefixes_without_changing_outputs(smollm2, join):
    """A cached prompt's rows join either by running its last tokens in the decode steps (``fed``, the
    default for a short uncached tail) or by a prefill forward over the ``[pad][cached prefix][pad][suffix]``
    layout (``prefilled``): both give the outputs of a backend with no cache."""
    from marco.llm.hf import HFBackend

    plain = HFBackend(smollm2.model, smollm2.tokenizer, "smollm2", prefix_cache_bytes=0)
    cached = HFBackend(smollm2.model, smollm2.tokenizer, "smollm2")
    if join == "prefilled":
        cached.FEED_TOKENS = 0
    ps = prompts(smollm2)
    first = cached.generate([GenerationRequest(p, 16) for p in ps])
    # continue each prompt from its own generation: the whole first part is in the cache now
    longer = [p + g[0].token_ids for p, g in zip(ps, first)]
    before = cached.prefix_cache.hits_tokens
    a = cached.generate([GenerationRequest(p, 16, temperature=0.7, seed=3, n=2) for p in longer])
    assert cached.prefix_cache.hits_tokens - before >= sum(len(p) for p in longer) - 16 * len(longer) - 16 * 3
    assert cached.fed_rows == (2 * len(longer) if join == "fed" else 0)
    b = plain.generate([GenerationRequest(p, 16, temperature=0.7, seed=3, n=2) for p in longer])
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            assert x.token_ids == y.token_ids
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-3)


def test_continuous_batching_matches_round_by_round_lockstep(smollm2, data_dir):
    task = get_task("mgsm")
    problems = task.load(str(data_dir), ["en"], 3)
    config = SearchConfig(strategy="mcts", action="ministep:16", budget=128, children=2, max_answer_tokens=32, seed=4)
    trees = []
    for continuous in (False, True):
        smollm2.prefix_cache.clear()
        driver = LockstepDriver(smollm2, task, config, continuous=continuous)
        results = driver.run(problems)
        trees.append([[(n.id, n.token_ids, n.visits) for n in r.tree] for r in results])
        assert all(0 < r.tokens <= 128 for r in results)
    assert trees[0] == trees[1]


def test_a_small_kv_budget_changes_neither_the_search_nor_the_peak_limit(smollm2, data_dir):
    """Continuous-batched MCTS with a KV budget of a row or two gives the same trees as with a roomy one,
    and the cache (slots + prefill + prefix cache) never holds more than the budget."""
    from marco.llm.hf import HFBackend

    task = get_task("mgsm")
    problems = task.load(str(data_dir), ["en"], 2)
    config = SearchConfig(strategy="mcts", action="ministep:16", budget=96, children=2, max_answer_tokens=32, seed=2)
    trees = []
    backends = [HFBackend(smollm2.model, smollm2.tokenizer, "smollm2", kv_cache_mb=mb) for mb in (1024, 48)]
    for backend in backends:
        results = LockstepDriver(backend, task, config).run(problems)
        trees.append([[(n.id, n.token_ids, n.visits) for n in r.tree] for r in results])
    assert trees[0] == trees[1]
    roomy, small = backends
    assert small.kv_budget.total == 48 << 20 and small.kv_budget.over_budget_admissions == 0
    assert small.kv_budget.peak <= small.kv_budget.total < roomy.kv_budget.peak
    assert small.peak_rows < roomy.peak_rows
