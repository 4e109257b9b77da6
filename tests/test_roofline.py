"""bench/roofline.py: the model's FLOPs per token and the machine's limit from the fastest matmul per shape."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is scripts, not an installed package
from bench import roofline  # noqa: E402

SMOLLM2 = types.SimpleNamespace(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152)


def test_flops_per_token_count_every_linear_layer_and_attention_over_the_context() -> None:
    linear = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3) + 576 * 49152
    assert linear == pytest.approx(134.5e6, rel=1e-3)  # SmolLM2-135M's multiply-adds, LM head included
    assert roofline.model_flops_per_token(SMOLLM2, 0) == 2 * linear
    assert roofline.model_flops_per_token(SMOLLM2, 100) - roofline.model_flops_per_token(SMOLLM2, 0) == (
        2 * 30 * 2 * 9 * 64 * 100)


def test_the_limit_takes_the_faster_of_plain_and_prepacked_matmuls_per_shape(monkeypatch) -> None:
    # plain: 100 GFLOP/s everywhere but the LM head (20); prepacked: 80 everywhere but the LM head (60);
    # panels: 90 everywhere but the q/o shape (120)
    def fake(rows, fan_in, fan_out, dtype, seconds=0.3, packed=False, panels=False):  # type: ignore[no-untyped-def]
        head = fan_out == 49152
        if panels:
            return 120.0 if (fan_in, fan_out) == (576, 576) else 90.0
        return (60.0 if head else 80.0) if packed else (20.0 if head else 100.0)

    monkeypatch.setattr(roofline, "time_linear", fake)
    monkeypatch.setattr(roofline, "packing_available", lambda dtype: True)
    monkeypatch.setattr(roofline, "panels_available", lambda dtype: True)
    rates = {(i, o): g for i, o, g in roofline.matmul_roofline(SMOLLM2, rows=64).per_shape}
    assert rates[(576, 576)] == 120.0 and rates[(576, 49152)] == 90.0 and rates[(576, 1536)] == 100.0
    monkeypatch.setattr(roofline, "panels_available", lambda dtype: False)
    r = roofline.matmul_roofline(SMOLLM2, rows=64)
    rates = {(i, o): g for i, o, g in r.per_shape}
    assert rates[(576, 49152)] == 60.0 and rates[(576, 576)] == 100.0
    layers = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)
    head = 576 * 49152
    assert r.gflops == pytest.approx((layers + head) / (layers / 100.0 + head / 60.0))
    monkeypatch.setattr(roofline, "packing_available", lambda dtype: False)
    assert roofline.matmul_roofline(SMOLLM2, rows=64).gflops == pytest.approx(
        (layers + head) / (layers / 100.0 + head / 20.0))


@pytest.mark.skipif(not roofline.packing_available(torch.float32), reason="no oneDNN in this torch build")
def test_a_prepacked_matmul_is_timed_for_real() -> None:
    assert roofline.time_linear(8, 64, 96, torch.float32, seconds=0.01, packed=True) > 0
    assert roofline.time_linear(8, 64, 96, torch.float32, seconds=0.01) > 0
    from marco.llm.kernels import linear_panels_op

    for dtype in (torch.float32, torch.bfloat16):
        assert roofline.panels_available(dtype) == (linear_panels_op(dtype) is not None)
        if roofline.panels_available(dtype):
            assert roofline.time_linear(8, 64, 96, dtype, seconds=0.01, panels=True) > 0
    assert not roofline.panels_available(torch.float16)
