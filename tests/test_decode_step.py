"""marco.llm.decode_step: a Llama decode step without transformers' module stack gives the model's own
forward's outputs, and is used only where it applies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from marco.llm.base import GenerationRequest
from marco.llm.decode_step import (
    PACK_ENV, PANELS_ENV, LlamaDecode, pack_weights_wanted, packed_float32_pays, panels_wanted, unsupported,
    weight_format,
)
from marco.llm.kernels import decode_attention_op, linear_panels_op
from marco.llm.precision import local_cpu_flags

pytestmark = pytest.mark.skipif(decode_attention_op() is None, reason="the native kernels did not build here")
# prepacked bfloat16 weights need oneDNN's bfloat16 matmuls (AVX512-BF16 or AMX)
PACKED_HERE = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
ONEDNN = torch.backends.mkldnn.is_available()
PANELS = linear_panels_op() is not None  # the native float32 panel kernel (AVX2 and FMA)
PANELS_BF16 = linear_panels_op(torch.bfloat16) is not None  # its bfloat16 path (AVX512-BF16)


class CharTokenizer:
    eos_token_id = 0
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:  # type: ignore[no-untyped-def]
        return "".join(chr(32 + int(t)) for t in ids)


@pytest.fixture(scope="module")
def tiny_llama():
    """A random 2-layer Llama with grouped KV heads in float32 (the native kernels' dtypes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).float().eval()


def tiny_backend(model):  # type: ignore[no-untyped-def]
    from marco.llm.hf import HFBackend

    return HFBackend(model, CharTokenizer(), "tiny", kv_cache_mb=64)


def requests(seed: int = 0) -> list[GenerationRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):
        prompt = rng.integers(1, 64, size=int(rng.integers(3, 40))).tolist()
        out.append(GenerationRequest(prompt, int(rng.integers(4, 30)), temperature=0.8 if i % 2 else 0.0,
                                     n=3 if i % 2 else 1, seed=i, ignore_eos=True))
    return out


def run(b, reqs, fast: bool):  # type: ignore[no-untyped-def]
    b.fast_decode = fast
    if b.prefix_cache is not None:
        b.prefix_cache.clear()
    steps = b.fast_steps
    out = b.generate(reqs)
    return out, b.fast_steps - steps


@pytest.mark.parametrize(("dtype", "packing"), [
    (torch.float32, "0"), (torch.float32, "1"), (torch.float32, "panels"), (torch.bfloat16, ""),
    (torch.bfloat16, "panels"),
])
def test_fast_steps_give_the_models_own_outputs_on_a_tiny_llama(tiny_llama, dtype, packing, monkeypatch) -> None:
    """float32 on F.linear: within 1e-5 of the forward. float32 prepacked for oneDNN (its sgemm, not MKL's) or
    into the native kernel's panels: within 1e-4, float32 rounding through two layers. bfloat16: packed where
    oneDNN multiplies it natively (its F.linear kernel: the same numbers); in bfloat16 panels, whose outputs
    differ from oneDNN's by one bfloat16 step in a few in 10^5, within 0.05."""
    if packing == "1" and not ONEDNN:
        pytest.skip("no oneDNN in this torch build")
    if packing == "panels" and not (PANELS if dtype == torch.float32 else PANELS_BF16):
        pytest.skip(f"no {dtype} panel kernel here")
    if packing == "panels":
        monkeypatch.delenv(PACK_ENV, raising=False)
        monkeypatch.setenv(PANELS_ENV, "1")
    else:
        monkeypatch.setenv(PACK_ENV, packing)
        monkeypatch.setenv(PANELS_ENV, "0")
    model = tiny_llama if dtype == torch.float32 else copy.deepcopy(tiny_llama).to(dtype)
    b = tiny_backend(model)
    assert b.fast_decoder() is not None
    want_packed = packing in ("1", "panels") or (dtype == torch.bfloat16 and PACKED_HERE)
    assert b.fast_decoder().packed == want_packed
    assert (b.fast_decoder().weights == "panels") == (packing == "panels")
    tol = 1e-4 if dtype == torch.float32 and want_packed else 0.05 if packing == "panels" else 1e-5
    reqs = requests()
    fast, fast_steps = run(b, reqs, True)
    plain, plain_steps = run(b, reqs, False)
    assert fast_steps > 0 and plain_steps == 0
    for a, c in zip(fast, plain):
        assert [g.token_ids for g in a] == [g.token_ids for g in c]  # greedy and seeded samples alike
        for x, y in zip(a, c):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=tol)
            np.testing.assert_allclose(x.top_logprobs, y.top_logprobs, atol=tol)
            assert x.top_ids == y.top_ids


@pytest.mark.parametrize(("dtype", "packing"), [
    (torch.float32, "panels"), (torch.float32, "1"), (torch.bfloat16, "panels"), (torch.bfloat16, "1"),
])
def test_fused_residual_adds_and_silu_mul_change_no_output(tiny_llama, dtype, packing, monkeypatch) -> None:
    """The rotary embedding and slot writes as one op, the residual adds inside the o and down products
    (panels) and ``silu(gate) * up`` as one op (packed, fused gate and up) give the unfused step's tokens and
    log-probabilities to the bit, in float32 and in bfloat16 (its roundings after the product and after the
    add, and silu's before the multiply, as torch's ops round)."""
    bf16 = dtype == torch.bfloat16
    if packing == "panels" and not (PANELS_BF16 if bf16 else PANELS) or packing == "1" and not (
            PACKED_HERE if bf16 else ONEDNN):
        pytest.skip(f"no {packing} weights in {dtype} here")
    monkeypatch.setenv(PANELS_ENV, "1" if packing == "panels" else "0")
    if packing == "panels":
        monkeypatch.delenv(PACK_ENV, raising=False)
    else:
        monkeypatch.setenv(PACK_ENV, packing)
    model = copy.deepcopy(tiny_llama).to(dtype) if bf16 else tiny_llama
    b = tiny_backend(model)
    fused = b.fast_decoder()
    assert fused is not None and fused._silu_mul is not None and fused._rope_write is not None
    assert (fused._add is not None) == (packing == "panels")
    reqs = requests(3)
    want, _ = run(b, reqs, True)
    b._fast = LlamaDecode(model, fuse=False)
    assert b._fast._silu_mul is None and b._fast._add is None and b._fast._rope_write is None
    got, steps = run(b, reqs, True)
    assert steps > 0
    for a, c in zip(got, want):
        assert [g.token_ids for g in a] == [g.token_ids for g in c]
        for x, y in zip(a, c):
            assert x.logprobs == y.logprobs and x.top_logprobs == y.top_logprobs and x.top_ids == y.top_ids


def test_packing_follows_the_setting_and_the_size_limit(tiny_llama, monkeypatch) -> None:
    monkeypatch.delenv(PACK_ENV, raising=False)
    monkeypatch.setenv(PANELS_ENV, "0")
    bf16 = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    # float32: packed where oneDNN's prepacked sgemm is the faster one at the LM head's shape on this CPU
    assert pack_weights_wanted(tiny_llama) == (ONEDNN and packed_float32_pays(tiny_llama.lm_head.weight))
    assert pack_weights_wanted(bf16) == PACKED_HERE
    assert not pack_weights_wanted(bf16, limit=1000)  # copies larger than the limit are not made
    assert not pack_weights_wanted(tiny_llama, limit=1000)
    assert not pack_weights_wanted(copy.deepcopy(tiny_llama).double())
    monkeypatch.setenv(PACK_ENV, "0")
    assert not pack_weights_wanted(bf16) and not LlamaDecode(bf16).packed
    assert not pack_weights_wanted(tiny_llama) and not LlamaDecode(tiny_llama).packed
    monkeypatch.setenv(PACK_ENV, "1")
    assert pack_weights_wanted(bf16, limit=1000) == PACKED_HERE
    assert pack_weights_wanted(tiny_llama, limit=1000) == ONEDNN


@pytest.mark.skipif(not PANELS, reason="no AVX2/FMA panel kernel here")
def test_the_panel_kernel_is_taken_by_a_fixed_rule_of_dtype_and_cpu(tiny_llama, monkeypatch) -> None:
    """float32 on every CPU with the kernel (AVX2 and FMA, or AVX-512); bfloat16 on AVX512-BF16 CPUs, AMX ones
    included (where this build has the bfloat16 path). A fixed rule, not a timing: a given CPU always multiplies with the same kernel (the same
    rounding)."""
    from marco.llm import decode_step

    for name in (PACK_ENV, PANELS_ENV):
        monkeypatch.delenv(name, raising=False)
    bf16 = copy.deepcopy(tiny_llama).to(torch.bfloat16)

    def cpu(*flags: str) -> None:
        monkeypatch.setattr(decode_step, "local_cpu_flags", lambda: {"avx2", "fma", *flags})

    cpu()
    assert panels_wanted(tiny_llama) and weight_format(tiny_llama) == "panels"
    assert LlamaDecode(tiny_llama).weights == "panels"
    assert not panels_wanted(bf16) and not panels_wanted(tiny_llama, limit=1000)
    cpu("avx512f")  # the kernel's AVX-512 tiles beat oneDNN's and MKL's float32 kernels there too
    assert panels_wanted(tiny_llama) and not panels_wanted(bf16)
    cpu("avx512f", "avx512_bf16")
    assert panels_wanted(tiny_llama) and panels_wanted(bf16) == PANELS_BF16
    cpu("avx512f", "avx512_bf16", "amx_bf16")  # there the kernel multiplies on AMX's tiles
    assert panels_wanted(bf16) == PANELS_BF16 and panels_wanted(tiny_llama)
    monkeypatch.setenv(PANELS_ENV, "1")  # asked for: on any CPU with the kernel, whatever the size
    assert panels_wanted(tiny_llama, limit=1000) and panels_wanted(bf16, limit=1000) == PANELS_BF16
    monkeypatch.setenv(PANELS_ENV, "0")
    cpu()
    assert not panels_wanted(tiny_llama)
    monkeypatch.delenv(PANELS_ENV)
    monkeypatch.setenv(PACK_ENV, "1")  # oneDNN's packing asked for
    assert weight_format(tiny_llama) == ("onednn" if ONEDNN else "plain")
    monkeypatch.setenv(PACK_ENV, "0")  # no copies at all
    assert weight_format(tiny_llama) == "plain" and LlamaDecode(tiny_llama).weights == "plain"
    assert LlamaDecode(tiny_llama, weights="panels").weights == "panels"
    with pytest.raises(ValueError, match="weights='blocked' is not one of plain, onednn, panels"):
        LlamaDecode(tiny_llama, weights="blocked")
    monkeypatch.setattr(decode_step, "linear_panels_op", lambda dtype=torch.float32: None)  # a build without it
    with pytest.raises(ValueError, match="needs the native panel kernel in the model's dtype"):
        LlamaDecode(tiny_llama, weights="panels")


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN in this torch build")
def test_the_float32_packing_decision_is_a_measured_speedup_kept_per_shape() -> None:
    from marco.llm import decode_step

    w = torch.randn(96, 32)
    assert packed_float32_pays(w, margin=0.0)  # any measured speed-up passes a zero margin
    key = (96, 32, 64, torch.get_num_threads())
    speedup = decode_step._SPEEDUP[key]
    assert speedup > 0
    assert not packed_float32_pays(w, margin=speedup * 1.01) and packed_float32_pays(w, margin=speedup)
    assert decode_step._SPEEDUP[key] == speedup  # measured once, not per call
    # the packed product is float32 rounding away from F.linear's
    x = torch.randn(5, 32)
    torch.testing.assert_close(decode_step._packed_linear(x, decode_step._pack(w)), torch.nn.functional.linear(x, w),
                               atol=1e-5, rtol=1e-5)


def test_what_it_cannot_run_keeps_the_models_forward(tiny_llama) -> None:
    assert unsupported(tiny_llama) is None
    assert "dtype" in str(unsupported(copy.deepcopy(tiny_llama).double())) or "float64" in str(
        unsupported(copy.deepcopy(tiny_llama).double()))
    hooked = copy.deepcopy(tiny_llama)
    handle = hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert "hook on model.layers.1.mlp" in str(unsupported(hooked))

    class Adapter(torch.nn.Linear):
        pass

    adapted = copy.deepcopy(tiny_llama)
    old = adapted.model.layers[0].self_attn.q_proj
    adapted.model.layers[0].self_attn.q_proj = Adapter(old.in_features, old.out_features, bias=False)
    assert "not a plain Linear" in str(unsupported(adapted))
    with pytest.raises(ValueError, match="cannot run this model"):
        LlamaDecode(adapted)

    class Wrapper(torch.nn.Module):  # peft's LoRA layers hold the Linear rather than subclass it
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base_layer = base

        @property
        def weight(self) -> torch.Tensor:
            return self.base_layer.weight

    wrapped = copy.deepcopy(tiny_llama)
    wrapped.model.layers[1].mlp.down_proj = Wrapper(wrapped.model.layers[1].mlp.down_proj)
    assert "model.layers.1.mlp.down_proj is a Wrapper" in str(unsupported(wrapped))
    # a backend whose model gains a hook runs its next batch through the model's forward (hooks see it)
    b = tiny_backend(hooked)
    calls = []
    handle.remove()
    hooked.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    out, steps = run(b, requests()[:2], True)
    assert steps == 0 and len(calls) > 1


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_steps_give_the_models_own_outputs_on_smollm2(smollm2, dtype) -> None:
    """Same operations in the same order and dtype as transformers' Llama forward. float32: within 1e-4 (the
    matmul library may block a [rows, 576] product differently from a [rows, 1, 576] one, and the attention's
    softmax blocks split at a request's shared prompt); 1e-3 with oneDNN's prepacked sgemm for MKL's.
    bfloat16: its prepacked, fused matmuls are the oneDNN kernel F.linear calls, so the same tokens and
    log-probabilities within 1e-2 (a few bfloat16 steps of a logit of ~20); both were identical to the bit on an AVX512-BF16
    EPYC (2026-12-06). But where the fast step's attention reads a request's shared prompt once (the
    bfloat16 path of ``decode_attention_shared`` on AVX-512 CPUs) or the panel kernel multiplies, its sums
    are taken in another order (softmax blocks split at the prompt's end; another tiling) and rounded to
    bfloat16 a step apart now and then: bfloat16's own noise, checked as test_precision's 0.6 nats up to the
    first different token, which must be a near-tie (an exact tie on an AMX Xeon, 2026-12-07)."""
    from marco.llm import load_backend

    b = smollm2 if dtype == torch.float32 else load_backend("smollm2", dtype="bfloat16")
    assert b.kv_spec.dtype == dtype
    questions = ["What is 7 times 8?", "Anna has 3 cats and gets 4 more. How many cats?"]
    prompts = [b.apply_chat_template([{"role": "user", "content": q}], "<Thought>\n") for q in questions]
    reqs = [GenerationRequest(p, 32, ignore_eos=True) for p in prompts]
    reqs.append(GenerationRequest(prompts[1], 32, temperature=1.0, n=3, seed=5, ignore_eos=True))
    try:
        fast, fast_steps = run(b, reqs, True)
        plain, plain_steps = run(b, reqs, False)
    finally:
        b.fast_decode = True
    assert fast_steps >= 31 and plain_steps == 0
    assert b.fast_decoder() is not None and b.fast_decoder().weights == weight_format(b.model)
    if dtype == torch.bfloat16 and (b.fast_decoder().weights == "panels" or "avx512f" in local_cpu_flags()):
        # the panel kernel rounds a few outputs in 10^5 one bfloat16 step apart from oneDNN's, and so does the
        # shared-prompt attention; carried through 30 layers of bfloat16 activations that is bfloat16's own
        # noise: log-probabilities within the 0.6 nats test_precision allows bfloat16 against float32, and a
        # near-tie may go the other way
        for a, c in zip(fast, plain):
            for x, y in zip(a, c):
                agree_until_a_near_tie(x, y, tol=0.6, greedy=not reqs[fast.index(a)].temperature)
        return
    # float32 plain: the same matmuls, but the fast step's attention splits its softmax blocks at a request's
    # shared prompt (decode_attention_shared), the forward's does not: 1.2e-5 apart seen on an AMX Xeon
    tol = (1e-3 if b.fast_decoder().packed else 1e-4) if dtype == torch.float32 else 1e-2
    for a, c in zip(fast, plain):
        assert [g.token_ids for g in a] == [g.token_ids for g in c]
        for x, y in zip(a, c):
            np.testing.assert_allclose(x.top_logprobs, y.top_logprobs, atol=tol)


def agree_until_a_near_tie(x, y, tol: float, greedy: bool) -> None:  # type: ignore[no-untyped-def]
    """``x`` and ``y`` (Generations of one request) have top-5 log-probabilities within ``tol`` while their
    tokens are the same; a greedy one's first different token was within ``2 tol`` of the other's choice."""
    for i, (tx, ty) in enumerate(zip(x.token_ids, y.token_ids)):
        np.testing.assert_allclose(x.top_logprobs[i], y.top_logprobs[i], atol=tol)
        if tx != ty:
            if greedy:
                assert tx in y.top_ids[i], (i, tx, y.top_ids[i])
                assert y.top_logprobs[i][0] - y.top_logprobs[i][y.top_ids[i].index(tx)] <= 2 * tol
            return


def test_native_batches_skip_zeroing_the_slots_and_never_read_an_unwritten_column(tiny_llama, monkeypatch) -> None:
    """With the native kernel the slot buffers are left uninitialised (no write of their whole size); filled
    with NaN instead, the outputs are still those of zeroed buffers: no column past a row's length is read."""
    import types

    from marco.llm import kvcache

    b = tiny_backend(tiny_llama)
    reqs = requests(seed=1)
    want, _ = run(b, reqs, True)
    empties = []

    def nan_empty(*shape, **kw):  # type: ignore[no-untyped-def]
        empties.append(shape)
        return torch.full(*shape, float("nan"), **kw) if len(shape) == 1 else torch.full(shape, float("nan"), **kw)

    monkeypatch.setattr(kvcache, "torch", types.SimpleNamespace(**{**vars(torch), "empty": nan_empty}))
    got, steps = run(b, reqs, True)
    assert empties and steps > 0  # the buffers came from empty, NaN-filled
    for a, c in zip(got, want):
        assert [g.token_ids for g in a] == [g.token_ids for g in c]
        for x, y in zip(a, c):
            assert np.isfinite(x.logprobs).all()
            np.testing.assert_array_equal(x.top_logprobs, y.top_logprobs)


@pytest.fixture(scope="module")
def tiny_llama64():
    """A random 2-layer Llama with SmolLM2's head size (64) and query heads per KV head (3), float32: the
    shape the shared-columns attention has its vector path for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=384, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_samples_of_a_request_read_their_shared_prompt_once_with_the_same_outputs(
    tiny_llama64, monkeypatch, dtype
) -> None:
    """A request's k samples hold copies of one prefill's prompt columns; the decode step's attention reads
    them once for the group (``decode_attention_shared``: float32 with AVX2, bfloat16 with AVX-512). Every
    token and log-probability is, to the bit, what the rows give each reading its own copy, with rows retiring
    at different steps (the group's first row, whose slot the others read, among them)."""
    from marco.llm import hf

    b = tiny_backend(copy.deepcopy(tiny_llama64).to(dtype))
    fast = b.fast_decoder()
    assert fast is not None
    groups: list[int] = []
    inner = fast._attend_shared

    def counting(q, k, v, lens, src, split, scale):  # type: ignore[no-untyped-def]
        groups.append(int((src != torch.arange(len(src))).sum()))
        return inner(q, k, v, lens, src, split, scale)

    monkeypatch.setattr(fast, "_attend_shared", counting)
    rng = np.random.default_rng(3)
    reqs = [GenerationRequest(rng.integers(1, 64, size=int(rng.integers(20, 70))).tolist(), int(rng.integers(8, 40)),
                              temperature=0.9, n=3, seed=i) for i in range(5)]
    shared, _ = run(b, reqs, True)
    assert max(groups) > 0  # rows did read another row's columns
    original = hf._DecodeBatch._shared_columns

    def alone(self):  # type: ignore[no-untyped-def]
        src, split = original(self)
        return torch.arange(len(src)), split

    monkeypatch.setattr(hf._DecodeBatch, "_shared_columns", alone)
    groups.clear()
    own, _ = run(b, reqs, True)
    assert groups and max(groups) == 0
    uneven = 0
    for a, c in zip(shared, own):
        assert [g.token_ids for g in a] == [g.token_ids for g in c]
        uneven += len({len(g.token_ids) for g in a}) > 1
        for x, y in zip(a, c):
            assert x.logprobs == y.logprobs and x.top_logprobs == y.top_logprobs
    assert uneven  # some request's samples finished at different steps (end of sequence)
