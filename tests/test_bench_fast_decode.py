"""bench/fast_decode.py and bench/packed_linear.py at minimal sizes: both sides run, the same answers, the
ratio line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marco.llm.kernels import decode_attention_op, linear_panels_op
from marco.llm.precision import cpu_has_fast_bf16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=550)


@pytest.mark.skipif(decode_attention_op() is None, reason="the native kernels did not build here")
def test_fast_decode_bench_runs_both_paths_to_the_same_answers() -> None:
    # float32: the two paths' sums differ at float32's rounding only; in bfloat16 on AVX-512 the fast step's
    # attention splits its softmax blocks at a request's shared prompt, and a near-tie may go another way
    out = bench("fast_decode.py", "--problems", "1", "--budget", "128", "--dtype", "float32")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    rows = re.findall(r"^0\s+(forward|fast)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+[\d.]+$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["forward", "fast"], report[-5000:]
    assert rows[0][1] == rows[1][1] and rows[0][4] == rows[1][4]  # the same tokens in the same steps
    assert "same answers on every problem: True" in out.stdout
    ratio = re.search(r"^fast_decode_vs_forward: ([\d.]+)$", out.stdout, re.M)
    want = float(rows[1][3]) / float(rows[0][3])
    assert ratio and float(ratio[1]) == pytest.approx(want, rel=0.01), report[-5000:]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packed_linear_bench_gives_the_same_outputs(dtype: str) -> None:
    """bfloat16: one kernel both ways, the same outputs to the bit; float32: two libraries, float32 rounding."""
    if dtype == "bfloat16" and not (torch.ops.mkldnn._is_mkldnn_bf16_supported() and cpu_has_fast_bf16()):
        # without AVX512-BF16 or AMX oneDNN emulates bfloat16, and at 1 row F.linear takes another kernel
        # (0.002 apart on an AVX-512 Xeon without BF16)
        pytest.skip("no hardware bfloat16 matmul on this CPU")
    out = bench("packed_linear.py", "--rows", "1,64", "--reps", "2", "--dtype", dtype)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    num = r"\s+([\d.]+)"
    rows = re.findall(rf"^\s*(\d+){num * 6}  (\S+)$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "64"], report[-5000:]
    for r in rows:
        assert float(r[3]) == pytest.approx(float(r[1]) / float(r[2]), rel=0.05)
        assert float(r[7]) == (0.0 if dtype == "bfloat16" else pytest.approx(0.0, abs=1e-4)), report[-5000:]
    assert re.search(r"^packed_vs_plain_at_64_rows: [\d.]+$", out.stdout, re.M), report[-5000:]
    panels = re.findall(rf"^panels\s+(\d+){num * 6}  (\S+)$", out.stdout, re.M)
    if linear_panels_op(getattr(torch, dtype)) is not None:  # the native kernel against the packed products
        assert [r[0] for r in panels] == ["1", "64"], report[-5000:]
        # float32: rounding of the sums; bfloat16: a rare output one bfloat16 step apart (2^-5 below 8)
        most = 1e-4 if dtype == "float32" else 2**-5
        for r in panels:
            assert float(r[3]) == pytest.approx(float(r[1]) / float(r[2]), rel=0.05)
            assert float(r[7]) <= most, report[-5000:]
        assert re.search(r"^panels_vs_packed_at_64_rows: [\d.]+$", out.stdout, re.M), report[-5000:]
    else:
        assert not panels, report[-5000:]


@pytest.mark.skipif(decode_attention_op() is None, reason="the native kernels did not build here")
def test_attention_kernel_bench_times_both_paths_and_they_agree() -> None:
    out = bench("attention_kernel.py", "--rows", "4", "--dtype", "float32,bfloat16", "--reps", "1", "--shared")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    rows = re.findall(r"^(float32|bfloat16)\s+4\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+  (\S+)$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["float32", "bfloat16"], report[-5000:]
    shared = re.findall(r"^(float32|bfloat16)\s+4 shared prompts in groups of 3: ([\d.]+) ms, ([\d.]+) GB/s$", out.stdout, re.M)
    assert [r[0] for r in shared] == ["float32", "bfloat16"] and all(float(r[1]) > 0 for r in shared), report[-5000:]
    assert float(rows[0][4]) <= 1e-5 and float(rows[1][4]) <= 2e-2  # the kernel's stated tolerances
    ratio = re.search(r"^vector_vs_portable_at_4_rows: ([\d.]+)$", out.stdout, re.M)
    assert ratio and float(ratio[1]) == pytest.approx(float(rows[0][1]) / float(rows[0][2]), rel=0.1)


@pytest.mark.skipif(decode_attention_op() is None, reason="the native kernels did not build here")
def test_attention_kernel_bench_compares_with_a_git_revisions_kernel() -> None:
    """--base REV builds REV's kernel source into a library of its own and times both in separate processes."""
    out = bench("attention_kernel.py", "--base", "HEAD", "--rows", "4", "--dtype", "float32", "--reps", "1",
                "--rounds", "1", "--shared")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    row = re.search(r"^float32\s+4\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
    assert row and float(row[1]) > 0 and float(row[2]) > 0, report[-5000:]
    shared = re.search(r"^float32\s+4/shared\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
    assert shared and float(shared[1]) > 0 and float(shared[2]) > 0, report[-5000:]
    ratio = re.search(r"^vector_after_vs_before_at_4_rows: ([\d.]+)$", out.stdout, re.M)
    assert ratio and float(ratio[1]) == pytest.approx(float(row[3]), abs=0.01)
    bad = bench("attention_kernel.py", "--base", "no-such-revision", "--rows", "4")
    assert bad.returncode != 0 and "no-such-revision" in bad.stderr


@pytest.mark.skipif(linear_panels_op() is None, reason="no native panel kernel here")
def test_linear_kernel_bench_compares_with_a_git_revisions_panels() -> None:
    """--base REV builds REV's linear.cpp into a library of its own; both are timed in separate processes and
    their products agree with the exact sums."""
    out = bench("linear_kernel.py", "--base", "HEAD", "--rows", "3,13", "--reps", "1", "--rounds", "1")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    rows = re.findall(r"^\s+(3|13)" + r"\s+([\d.]+)" * 6 + r"\s+(\S+)$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["3", "13"], report[-5000:]
    for r in rows:
        assert all(float(x) > 0 for x in r[1:7]) and float(r[7]) <= 1e-4, report[-5000:]
    ratio = re.search(r"^panels_after_vs_before_at_3_rows: ([\d.]+)$", out.stdout, re.M)
    assert ratio and float(ratio[1]) > 0, report[-5000:]
    bad = bench("linear_kernel.py", "--base", "no-such-revision", "--rows", "3")
    assert bad.returncode != 0 and "no-such-revision" in bad.stderr
    assert bench("linear_kernel.py").returncode != 0  # --base is required


@pytest.mark.skipif(decode_attention_op() is None, reason="the native kernels did not build here")
def test_logit_stats_bench_times_both_and_they_agree() -> None:
    out = bench("logit_stats.py", "--rows", "3", "--reps", "2")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    row = re.search(r"^\s+3\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)  (True|False)\s+(\S+)$", out.stdout, re.M)
    assert row and row[4] == "True" and float(row[5]) <= 1e-4, report[-5000:]
    assert re.search(r"^native_vs_torch_at_3_rows: [\d.]+$", out.stdout, re.M), report[-5000:]


def test_logit_stats_bench_times_the_kernel_against_a_git_revision() -> None:
    """``--base REV``: the revision's kernel built apart and timed in processes of its own, alternating with this
    checkout's."""
    out = bench("logit_stats.py", "--rows", "3", "--reps", "2", "--base", "HEAD", "--rounds", "1")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    row = re.search(r"^\s+3\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
    assert row and float(row[1]) > 0 and float(row[2]) > 0, report[-5000:]
    assert re.search(r"^native_after_vs_before_at_3_rows: [\d.]+$", out.stdout, re.M), report[-5000:]


def test_prefill_groups_bench_runs_fewer_padded_tokens() -> None:
    out = bench("prefill_groups.py", "--problems", "8", "--rounds", "1")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    one = re.search(r"^one forward:\s+([\d.]+) s, (\d+) tokens", out.stdout, re.M)
    grouped = re.search(r"^grouped:\s+([\d.]+) s, (\d+) tokens", out.stdout, re.M)
    assert one and grouped, report[-5000:]
    real = int(re.search(r"^8 prompts, (\d+) tokens", out.stdout, re.M)[1])  # type: ignore[index]
    assert 0 < int(grouped[2]) <= int(one[2]) < real  # fewer padded tokens; the shared prefix ran once
    ratio = re.search(r"^grouped_vs_one_forward: ([\d.]+)$", out.stdout, re.M)
    assert ratio and float(ratio[1]) == pytest.approx(float(one[1]) / float(grouped[1]), rel=0.02), report[-5000:]


def test_shared_columns_bench_reads_fewer_columns_for_the_same_tokens() -> None:
    # float32: the kernel shares a group's reads in float32 on any AVX2 CPU (in bfloat16 only with AVX-512)
    out = bench("shared_columns.py", "--problems", "2", "--rounds", "1", "--budget", "256", "--threads", "2",
                env={"MARCO_DTYPE": "float32"})
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    share = dict(re.findall(r"^(own|shared)\s+\d+ tokens .* a step, (\d+)% of the columns a group's", out.stdout, re.M))
    assert set(share) == {"own", "shared"}, report[-5000:]
    assert int(share["own"]) == 0 and int(share["shared"]) > 0, report[-5000:]
    assert re.search(r"the same tokens both ways: True$", out.stdout, re.M), report[-5000:]
    assert re.search(r"^shared_vs_own_columns: [\d.]+ \(", out.stdout, re.M), report[-5000:]


def search_both_ways(script: str, labels: tuple[str, str], timed: str) -> tuple[dict[str, str], str, str]:
    """Run a bench that searches one problem one way and the other (``bench/mcts_batch.alternate_searches``):
    ``(tokens per label, the ratio line's value, the report)``."""
    out = bench(script, "--problems", "1", "--rounds", "1", "--budget", "128", "--threads", "2")
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    pattern = rf"^({labels[0]}|{labels[1]})\s+(\d+) tokens in .* {timed}\s+[\d.]+ ms a step"
    ratio = re.search(rf"^{labels[1]}_vs_{labels[0]}: ([\d.]+) \(", out.stdout, re.M)
    assert ratio, report[-5000:]
    return dict(re.findall(pattern, out.stdout, re.M)), ratio[1], report


@pytest.mark.skipif(linear_panels_op() is None, reason="no AVX2/FMA panel kernel here")
def test_linear_panels_bench_runs_the_search_both_ways() -> None:
    runs, ratio, report = search_both_ways("linear_panels.py", ("onednn", "panels"), "products")
    assert set(runs) == {"onednn", "panels"} and all(int(t) > 0 for t in runs.values()), report[-5000:]
    assert float(ratio) > 0, report[-5000:]


@pytest.mark.skipif(decode_attention_op() is None, reason="the native kernels did not build here")
def test_fused_ops_bench_runs_the_search_both_ways_to_the_same_tokens() -> None:
    runs, ratio, report = search_both_ways("fused_ops.py", ("apart", "fused"), "decode")
    assert set(runs) == {"apart", "fused"} and int(runs["apart"]) > 0, report[-5000:]
    assert runs["apart"] == runs["fused"], report[-5000:]  # equal to the bit: the same tokens
    assert float(ratio) > 0, report[-5000:]
