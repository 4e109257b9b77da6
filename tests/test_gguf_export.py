"""GGUF models load from a cached float32 safetensors export (marco/llm/export.py).

The cache logic is tested with a stand-in exporter (fast); the export itself against the real bundled GGUF:
the same float32 logits to the bit and the same tokenizer as loading the GGUF through transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from marco.llm import export


@pytest.fixture
def fake_exports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """export_gguf replaced by one that writes a finished folder and records where."""
    calls: list[Path] = []

    def fake(folder: str, file: str, out: os.PathLike[str], dtype: str = "float32") -> Path:
        target = Path(out)
        (target / "config.json").write_text("{}")
        (target / export.DONE).write_text("{}")
        calls.append(target)
        return target

    monkeypatch.setattr(export, "export_gguf", fake)
    monkeypatch.setenv("MARCO_CACHE", str(tmp_path / "cache"))
    return calls


def test_a_gguf_file_is_exported_once_then_read_from_the_cache(fake_exports: list[Path], tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF model")
    first = Path(export.local_model(str(gguf)))
    again = Path(export.local_model(str(gguf)))
    assert first == again and len(fake_exports) == 1
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("m-")
    assert (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folder left behind


def test_a_replaced_gguf_file_is_exported_again(fake_exports: list[Path], tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF model")
    first = export.local_model(str(gguf))
    gguf.write_bytes(b"GGUF model, retrained")
    second = export.local_model(str(gguf))
    assert first != second and len(fake_exports) == 2


def test_an_interrupted_export_leaves_nothing_a_later_load_would_take(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MARCO_CACHE", str(tmp_path / "cache"))

    def dies(folder: str, file: str, out: os.PathLike[str], dtype: str = "float32") -> Path:
        (Path(out) / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_gguf", dies)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF model")
    with pytest.raises(KeyboardInterrupt):
        export.local_model(str(gguf))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_non_gguf_specs_pass_through_and_a_missing_gguf_says_so(tmp_path: Path) -> None:
    assert export.local_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert export.local_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        export.local_model(str(tmp_path / "missing.gguf"))


def test_the_cache_root_reads_marco_cache_then_its_older_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MARCO_CACHE", raising=False)
    monkeypatch.setenv("MARCO_CACHE_DIR", str(tmp_path / "old"))
    assert export.cache_root() == tmp_path / "old"
    monkeypatch.setenv("MARCO_CACHE", str(tmp_path / "new"))
    assert export.cache_root() == tmp_path / "new"


@pytest.mark.slow
def test_the_bundled_models_export_computes_the_same_logits_and_tokens_as_its_gguf() -> None:
    """Bit-equal float32 logits (the export stores the GGUF's dequantised values unchanged) and the same
    token ids, chat template and special tokens; load_backend("smollm2") reads the export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from marco.llm import load_backend
    from marco.llm.hf import smollm2_path

    folder, file = smollm2_path()
    exported = export.local_model("smollm2")
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    tok = AutoTokenizer.from_pretrained(exported)
    texts = ["Natalia sold clips to 48 of her friends in April.", "题目：珍妮特的鸭子每天下 16 个蛋。",
             "<Thought>\nWait! Maybe I made some mistakes! I need to rethink from scratch.\n</Thought>", " 12 + 7 = 19 ✓"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == gguf_tok.encode(text, add_special_tokens=False)
    chat = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "What is 2+3?"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (gguf_tok.eos_token, gguf_tok.bos_token, gguf_tok.pad_token)
    assert len(tok) == len(gguf_tok)

    ids = torch.tensor([gguf_tok.encode(texts[0] + texts[2], add_special_tokens=False)])
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    with torch.inference_mode():
        reference = gguf_model(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)(ids).logits
    assert torch.equal(ours, reference)

    backend = load_backend("smollm2", dtype="float32")  # its forward has the library's own kernels: compare weights
    assert backend.model.config.name_or_path == exported and backend.name == "smollm2"
    weights, expected = backend.model.state_dict(), gguf_model.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_the_export_command_names_what_it_cannot_export(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from marco.cli import app

    for model in ("gpt2", str(tmp_path / "missing.gguf")):
        out = CliRunner().invoke(app, ["model", "export", model, str(tmp_path / "out")])
        assert out.exit_code == 1 and "is neither smollm2 nor a .gguf file" in out.output
        assert not (tmp_path / "out").exists()
