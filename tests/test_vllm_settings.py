"""vLLM engine settings, the worker's memory guard and how ``vllm:MODEL`` is routed (fast, no engine)."""

from __future__ import annotations

import os

import pytest

from marco.jobs import BackendCache, engine_family
from marco.llm.vllm_engine import VLLMSettings, cpu_id_list


def test_cpu_defaults_work_on_a_small_machine() -> None:
    s = VLLMSettings.from_env(max_rows=48, env={}).resolved(gpu=False)
    assert s.block_size == 32 and s.kv_gib == 1.0 and s.max_rows == 48 and s.enforce_eager
    assert s.dtype in ("float32", "bfloat16")
    # vLLM's own thread binding by default (binding every CPU made seeded samples depend on the batch)
    assert s.env() == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    kw = s.engine_kwargs()
    assert kw["logprobs_mode"] == "raw_logprobs" and kw["enable_prefix_caching"] and kw["max_logprobs"] == 5
    assert kw["max_num_seqs"] == 48 and kw["block_size"] == 32 and "kv_cache_memory_bytes" not in kw
    args = s.server_args()
    assert args[args.index("--block-size") + 1] == "32" and "--enable-prefix-caching" in args
    assert args[args.index("--logprobs-mode") + 1] == "raw_logprobs" and "--enforce-eager" in args
    # seeded requests crash vLLM's CPU worker when their prompt is split across steps
    assert kw["enable_chunked_prefill"] is False and "--no-enable-chunked-prefill" in args


def test_thread_binding_of_vllms_cpu_worker() -> None:
    assert cpu_id_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and cpu_id_list([3]) == "3"
    auto = VLLMSettings.from_env(env={"MARCO_VLLM_CPU_THREADS": "auto"}).resolved(gpu=False)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in auto.env()
    every = VLLMSettings.from_env(env={"MARCO_VLLM_CPU_THREADS": "all"}).resolved(gpu=False)
    assert every.env()["VLLM_CPU_OMP_THREADS_BIND"] == cpu_id_list(sorted(os.sched_getaffinity(0)))
    listed = VLLMSettings.from_env(env={"MARCO_VLLM_CPU_THREADS": "0-3"}).resolved(gpu=False)
    assert listed.env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    # a user's own vLLM variable is kept when Marco's is unset, and a GPU engine gets no CPU binding
    own = VLLMSettings.from_env(env={"VLLM_CPU_OMP_THREADS_BIND": "1"}).resolved(gpu=False)
    assert own.env()["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert VLLMSettings.from_env(env={}).resolved(gpu=True).env(gpu=True) == {}


def test_the_kv_space_is_one_setting_on_cpu_and_gpu() -> None:
    env = {"MARCO_VLLM_KV_GIB": "2.5", "MARCO_VLLM_DTYPE": "float32", "MARCO_VLLM_BLOCK_SIZE": "16"}
    cpu = VLLMSettings.from_env(env=env).resolved(gpu=False)
    assert cpu.env()["VLLM_CPU_KVCACHE_SPACE"] == "2.5" and cpu.dtype == "float32" and cpu.block_size == 16
    gpu = VLLMSettings.from_env(env=env).resolved(gpu=True)
    assert gpu.env(gpu=True) == {} and gpu.engine_kwargs(gpu=True)["kv_cache_memory_bytes"] == int(2.5 * 2**30)
    assert not gpu.enforce_eager and "--enforce-eager" not in gpu.server_args(gpu=True)
    assert "enable_chunked_prefill" not in gpu.engine_kwargs(gpu=True)
    assert not any("chunked" in a for a in gpu.server_args(gpu=True))
    assert "kv_cache_memory_bytes" not in VLLMSettings.from_env(env={}).resolved(gpu=True).engine_kwargs(gpu=True)


class Fake:
    def __init__(self, vllm: bool) -> None:
        self.uses_vllm_engine = vllm
        self.closed = False

    def close(self) -> None:
        self.closed = True


class HFBackend(Fake):  # engine_family looks at the class name, as for marco.llm.hf.HFBackend
    def __init__(self) -> None:
        super().__init__(False)


def test_a_vllm_engine_and_a_transformers_model_never_stay_loaded_together() -> None:
    loaded: dict[str, Fake] = {}

    def loader(spec: str) -> Fake:
        loaded[spec] = Fake(True) if spec.startswith("vllm:") else (Fake(False) if spec.startswith("server") else HFBackend())
        return loaded[spec]

    cache = BackendCache(loader)
    hf = cache.get("smollm2")
    served = cache.get("server+vllm:http://x:1")
    assert cache.get("smollm2") is hf  # cached
    v = cache.get("vllm:smollm2")
    assert hf.closed and not served.closed  # the transformers model went; a remote server's client stays
    assert cache.get("vllm:smollm2") is v
    hf2 = cache.get("smollm2")
    assert hf2 is not hf and v.closed
    v2 = cache.get("vllm:a")
    v3 = cache.get("vllm:b")
    assert v2.closed and not v3.closed  # one vLLM engine at a time
    cache.close()
    assert v3.closed and served.closed


def test_engine_family_of_specs() -> None:
    assert engine_family("vllm:smollm2") == "vllm"
    assert engine_family("smollm2") == "transformers" and engine_family("checkpoint:abc") == "transformers"
    assert engine_family("server+vllm:http://h:1") is None and engine_family("scripted") is None


def test_vllm_spec_without_vllm_here_starts_a_server_from_the_vllm_environment(monkeypatch) -> None:
    import marco.llm.vllm_engine as ve
    import marco.llm.vllm_server as vs
    from marco.llm import load_backend

    calls = []
    monkeypatch.setattr(ve, "vllm_available", lambda: "not importable")
    monkeypatch.setattr(vs, "vllm_python", lambda: "/opt/vllm/bin/python")
    monkeypatch.setattr(vs, "managed_backend", lambda model, name, rows, python=None: calls.append((model, name, rows, python)) or "B")
    assert load_backend("vllm:smollm2", max_batch_rows=32) == "B"
    assert calls == [("smollm2", "vllm:smollm2", 32, None)]
    monkeypatch.setattr(vs, "vllm_python", lambda: None)
    with pytest.raises(RuntimeError, match="not importable"):
        load_backend("vllm:smollm2")


def test_managed_server_command_and_missing_environment(monkeypatch, tmp_path) -> None:
    import marco.llm.vllm_server as vs

    s = vs.VLLMServer("/models/x", VLLMSettings(max_rows=8).resolved(gpu=False), python="/p/python", port=1234)
    cmd = s.command()
    assert cmd[:3] == ["/p/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/models/x" and cmd[cmd.index("--max-num-seqs") + 1] == "8"
    assert s.spec(retries=1) == "server+vllm:http://127.0.0.1:1234/v1?tokenizer=/models/x&retries=1#marco"
    monkeypatch.setattr(vs, "vllm_python", lambda: None)
    with pytest.raises(FileNotFoundError, match="make install"):
        vs.VLLMServer("/models/x").command()
