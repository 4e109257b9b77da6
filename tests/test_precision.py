"""The transformers backend's dtype: detection of hardware bfloat16, the setting, and bfloat16's agreement with
float32 on the real SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marco.llm.base import GenerationRequest
from marco.llm.precision import ENV_DTYPE, cpu_flags, cpu_has_fast_bf16, resolve_dtype

CPU = torch.device("cpu")

# Trimmed /proc/cpuinfo of the three kinds of machine this project meets (two processors each).
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
bugs\t\t: sysret_ss_attrs spectre_v1

processor\t: 1
flags\t\t: fpu vme de pse tsc msr pae mce sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
ZEN4_AVX512_BF16 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_vnni
"""
# AMX tiles with only the int8 instructions: no bfloat16 matmul in hardware
AMX_INT8_ONLY = """processor\t: 0
flags\t\t: fpu sse2 avx avx2 avx512f amx_tile amx_int8
"""


def test_cpu_flags_are_read_from_every_flags_line_only():
    flags = cpu_flags(EPYC_AVX2)
    assert {"avx2", "fma", "sha_ni"} <= flags
    assert "spectre_v1" not in flags  # the `bugs` line is not flags
    assert cpu_flags("") == set()


@pytest.mark.parametrize(
    "cpuinfo, fast",
    [(EPYC_AVX2, False), (XEON_AMX, True), (ZEN4_AVX512_BF16, True), (AMX_INT8_ONLY, False)],
    ids=["epyc-avx2", "xeon-amx", "zen4-avx512bf16", "amx-int8-only"],
)
def test_auto_picks_bfloat16_only_where_the_cpu_multiplies_it_in_hardware(cpuinfo, fast, monkeypatch):
    monkeypatch.delenv(ENV_DTYPE, raising=False)
    assert cpu_has_fast_bf16(cpuinfo) is fast
    assert resolve_dtype(None, CPU, cpuinfo) == (torch.bfloat16 if fast else torch.float32)
    assert resolve_dtype("auto", CPU, cpuinfo) == (torch.bfloat16 if fast else torch.float32)
    # CUDA: bfloat16 whatever the host CPU
    assert resolve_dtype("auto", torch.device("cuda"), cpuinfo) == torch.bfloat16


def test_this_machine_auto_follows_its_own_cpuinfo(monkeypatch):
    monkeypatch.delenv(ENV_DTYPE, raising=False)
    with open("/proc/cpuinfo") as f:
        flags = cpu_flags(f.read())
    expected = torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & flags else torch.float32
    assert resolve_dtype(None, CPU) == expected


def test_an_explicit_setting_wins_over_the_environment_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv(ENV_DTYPE, "bfloat16")
    assert resolve_dtype(None, CPU, EPYC_AVX2) == torch.bfloat16  # forced even without hardware support
    assert resolve_dtype("float32", CPU, XEON_AMX) == torch.float32
    monkeypatch.setenv(ENV_DTYPE, " Float32 ")
    assert resolve_dtype(None, CPU, XEON_AMX) == torch.float32
    monkeypatch.setenv(ENV_DTYPE, "fp8")
    with pytest.raises(ValueError, match="MARCO_DTYPE='fp8' is not one of auto, float32, bfloat16, float16"):
        resolve_dtype(None, CPU)
    with pytest.raises(ValueError, match="dtype='half'"):
        resolve_dtype("half", CPU)


def _on_bf16_grid(x: np.ndarray) -> np.ndarray:
    """Whether each float32 value is exactly representable in bfloat16 (its low 16 bits are zero)."""
    return (x.astype(np.float32).view(np.uint32) & 0xFFFF) == 0


@pytest.mark.slow
def test_bfloat16_top5_agrees_with_float32_on_smollm2(smollm2):
    """The bfloat16 backend's greedy generations, scored again by the float32 model on the same token ids.

    Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) in every weight and every
    activation between ops; over 30 layers that moves SmolLM2's logits (magnitude ~10-25) by ~0.1-0.3.
    Measured over these 2 prompts x 16 tokens (2026-12-06, AMD EPYC, bfloat16 emulated): top-5
    log-probabilities within 0.384 nats, the confidence c_i within 0.051, a generation's mean confidence
    within 0.0027; top-1 the same wherever float32's top two are more than 0.5 nats apart. The asserts leave
    about 1.5-7x room (0.6 nats, 0.1, 0.02): a different CPU's bf16 kernels (AMX) round in another order.
    """
    from marco.confidence import token_confidences
    from marco.llm import load_backend

    assert smollm2.kv_spec.dtype == torch.float32  # the fixture pins float32: the reference
    bf16 = load_backend("smollm2", dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.kv_spec.dtype == torch.bfloat16  # the KV cache is half the bytes
    questions = ["What is 2 + 3?", "A box holds 6 eggs. How many eggs are in 3 boxes?"]
    prompts = [bf16.apply_chat_template([{"role": "user", "content": q}], "<Thought>\n") for q in questions]
    gens = [g[0] for g in bf16.generate([GenerationRequest(p, 16, ignore_eos=True) for p in prompts])]
    lp_err, c_err, mean_err = [], [], []
    for prompt, gen in zip(prompts, gens):
        assert gen.num_tokens == 16
        top = np.array(gen.top_logprobs)
        # float32 log-softmax of bfloat16 logits: x - logsumexp(x) is off the bfloat16 grid almost always,
        # whereas a log-softmax taken in bfloat16 would land on it every time
        assert _on_bf16_grid(top).mean() < 0.5
        with torch.inference_mode():
            ref = smollm2.model(torch.tensor([prompt + gen.token_ids])).logits[0].float().log_softmax(-1)
        ref = ref[len(prompt) - 1 : len(prompt) - 1 + gen.num_tokens]
        ref_top = ref.topk(5, dim=-1)
        # bf16's top-5 ids scored by float32 against bf16's own figures for those ids
        ref_at_ids = ref.gather(1, torch.tensor(gen.top_ids)).numpy()
        lp_err.append(np.abs(ref_at_ids - top).max())
        ref_chosen = ref.gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0].tolist()
        c_bf = np.array(token_confidences(gen.logprobs, gen.top_logprobs))
        c_ref = np.array(token_confidences(ref_chosen, ref_top.values.tolist()))
        c_err.append(np.abs(c_bf - c_ref).max())
        mean_err.append(abs(c_bf.mean() - c_ref.mean()))
        clear = (ref_top.values[:, 0] - ref_top.values[:, 1]) > 0.5
        assert (torch.tensor([t[0] for t in gen.top_ids]) == ref_top.indices[:, 0])[clear].all()
    print(f"bf16 vs f32: top-5 lp {max(lp_err):.3f}, c_i {max(c_err):.3f}, mean c {max(mean_err):.4f}")
    assert max(lp_err) < 0.6
    assert max(c_err) < 0.1
    assert max(mean_err) < 0.02
