"""CoT data: the example format, every quality filter, the importer, and the exports TRL reads."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from marco.data import CotExample, PreferencePair, chat, format_answer, parse_answer, read_jsonl, save_dataset
from marco.data import system_prompt, write_jsonl
from marco.data.filters import (
    ExactDedup,
    FilterReport,
    Language,
    LengthBounds,
    NearDedup,
    WellFormed,
    default_filters,
    run_filters,
)
from marco.data.importer import import_cot
from marco.data.lang import detect_lang
from marco.data.minhash import MinHasher, shingle_hashes, similarity

LANGS = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")


def _tsv(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        return [(r[0], r[1]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def exemplar_rows(data_dir: Path, lang: str) -> list[dict[str, str]]:
    """MGSM's worked exemplars of ``lang`` as Open-O1-style instruction/response rows."""
    answers = json.loads((data_dir / "mgsm" / "exemplars.json").read_text())["EXEMPLAR_NUMBER_ANSWERS"]
    rows = []
    for i, (q, a) in enumerate(_tsv(data_dir / "mgsm" / f"mgsm_exemplars_{lang}.tsv")):
        q = re.split(r"[:：]", q, maxsplit=1)[-1].strip()
        a = re.split(r"[:：]", a, maxsplit=1)[-1].strip()
        rows.append({"instruction": q, "response": format_answer(a, str(answers[i]))})
    return rows


def ex(question: str, answer: str, i: int = 0) -> CotExample:
    return CotExample(id=f"ex{i}", messages=chat(question, answer), source="test")


@pytest.fixture(scope="module")
def en_rows(data_dir: Path) -> list[dict[str, str]]:
    return exemplar_rows(data_dir, "en")


# ---------------------------------------------------------------------------------------------- format
def test_format_and_parse_answer_round_trip() -> None:
    text = format_answer("  3 + 2 = 5.  ", "5")
    assert text.startswith("<Thought>") and text.endswith("</Output>") and "</Thought>\n<Output>" in text
    assert parse_answer(text) == ("3 + 2 = 5.", "5")
    assert parse_answer("<Output>5</Output><Thought>x</Thought>") is None
    assert parse_answer("Sure! <Thought>x</Thought><Output>5</Output>") is None
    assert parse_answer("<Thought>a <Thought>b</Thought><Output>5</Output>") is None


def test_chat_uses_the_marco_system_prompt() -> None:
    messages = chat("q?", "a")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == system_prompt() and "<Thought>" in system_prompt()


def test_jsonl_round_trip(tmp_path: Path, en_rows: list[dict[str, str]]) -> None:
    examples = [
        CotExample(f"id{i}", chat(r["instruction"], r["response"]), "import:x", "en", 0.5 + i / 100, {"row": i})
        for i, r in enumerate(en_rows)
    ]
    assert write_jsonl(examples, tmp_path / "a.jsonl") == len(en_rows)
    assert read_jsonl(tmp_path / "a.jsonl") == examples
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize(
    "answer, reason",
    [
        ("The answer is 5.", "<Thought> appears 0 times"),
        ("<Thought>3 + 2 = 5</Thought>", "<Output> appears 0 times"),
        ("<Thought>a</Thought><Thought>b</Thought><Output>5</Output>", "<Thought> appears 2 times"),
        ("<Output>5</Output>\n<Thought>3 + 2</Thought>", "out of order"),
        ("Let me think. <Thought>3 + 2</Thought><Output>5</Output>", "text outside"),
        ("<Thought>  </Thought><Output>5</Output>", "empty <Thought>"),
        ("<Thought>3 + 2 = 5</Thought>\n<Output>\n</Output>", "empty <Output>"),
        ("", "no assistant answer"),
    ],
)
def test_well_formed_rejects_each_defect(answer: str, reason: str) -> None:
    got = WellFormed().reject(ex("What is 3 + 2?", answer))
    assert got is not None and reason in got


def test_well_formed_keeps_real_exemplars(en_rows: list[dict[str, str]]) -> None:
    examples = [ex(r["instruction"], r["response"], i) for i, r in enumerate(en_rows)]
    kept, report = run_filters(examples, [WellFormed()])
    assert kept == examples and report.removed_by("well_formed") == 0


def test_length_bounds(en_rows: list[dict[str, str]]) -> None:
    examples = [ex(r["instruction"], r["response"], i) for i, r in enumerate(en_rows)]
    lengths = sorted(len(e.answer) for e in examples)
    lo, hi = lengths[2], lengths[-3]  # two shorter and two longer ones fall outside
    kept, report = run_filters(examples, [LengthBounds(min_chars=lo, max_chars=hi)])
    assert all(lo <= len(e.answer) <= hi for e in kept)
    assert report.removed_by("length") == sum(1 for n in lengths if n < lo or n > hi) >= 4
    assert any("chars <" in r for _, r in report.steps[0].samples)
    assert run_filters(examples, [LengthBounds(None, None)])[0] == examples
    with pytest.raises(ValueError, match="above max_chars"):
        LengthBounds(100, 10)


def test_detect_lang_on_real_mgsm_questions(data_dir: Path) -> None:
    for lang in LANGS:
        questions = [q for q, _ in _tsv(data_dir / "mgsm" / f"mgsm_{lang}.tsv")]
        hits = sum(detect_lang(q) == lang for q in questions)
        assert hits >= 0.97 * len(questions), (lang, hits)
    assert detect_lang("12 + 7 = 19") == ""


def test_language_filter_keeps_requested_languages(data_dir: Path) -> None:
    examples = [
        ex(r["instruction"], r["response"], i)
        for i, r in enumerate(row for lang in LANGS for row in exemplar_rows(data_dir, lang))
    ]
    kept, report = run_filters(examples, [Language(["en", "zh"])])
    assert len(kept) == 16 and {e.lang for e in kept} == {"en", "zh"}
    assert report.removed_by("language") == len(examples) - 16
    assert all(e.lang for e in examples)  # the step records what it detected


def test_language_consistency(data_dir: Path) -> None:
    en, zh = exemplar_rows(data_dir, "en")[0], exemplar_rows(data_dir, "zh")[0]
    mixed = ex(zh["instruction"], en["response"])  # a Chinese question answered in English
    assert Language(consistent=True).reject(mixed) == "question is zh but answer is en"
    assert Language().reject(mixed) is None
    assert Language(consistent=True).reject(ex(zh["instruction"], zh["response"])) is None


def test_exact_dedup_ignores_case_and_whitespace(en_rows: list[dict[str, str]]) -> None:
    examples = [ex(r["instruction"], r["response"], i) for i, r in enumerate(en_rows)]
    r0 = en_rows[0]
    copies = [
        ex(r0["instruction"].upper(), r0["response"], 100),
        ex(r0["instruction"], r0["response"].replace(" ", "  \n "), 101),
    ]
    kept, report = run_filters(examples + copies, [ExactDedup()])
    assert kept == examples
    assert report.steps[0].samples[0] == ("ex100", "same as ex0")
    # A near copy is not an exact one.
    near = ex(r0["instruction"], r0["response"].replace("5 + 6", "6 + 5"), 102)
    assert run_filters(examples + [near], [ExactDedup()])[0][-1] is near


def test_minhash_estimates_jaccard(data_dir: Path) -> None:
    questions = [q for q, _ in _tsv(data_dir / "mgsm" / "mgsm_en.tsv")][:40]
    hasher = MinHasher(num_perm=256, seed=1)
    pairs = [(questions[i], questions[i][: len(questions[i]) * 2 // 3] + questions[i + 1][:40]) for i in range(20)]
    pairs += [(questions[i], questions[i + 20]) for i in range(20)]
    for a, b in pairs:
        sa, sb = set(shingle_hashes(a).tolist()), set(shingle_hashes(b).tolist())
        exact = len(sa & sb) / len(sa | sb)
        assert abs(similarity(hasher.signature(a), hasher.signature(b)) - exact) < 0.12


def test_near_dedup_threshold(data_dir: Path) -> None:
    rows = _tsv(data_dir / "mgsm" / "mgsm_en.tsv")[:50]
    examples = [ex(q, format_answer(f"The answer is {a}.", a), i) for i, (q, a) in enumerate(rows)]
    q0, a0 = rows[0]
    edited = ex(q0.replace("eggs", "egg"), format_answer(f"The answer is {a0}.", a0), 100)  # a small edit
    half = ex(q0[: len(q0) // 2] + rows[1][0][len(rows[1][0]) // 2 :], format_answer("x", "1"), 101)
    kept, report = run_filters(examples + [edited, half], [NearDedup(0.8)])
    assert edited not in kept and half in kept and len(kept) == len(examples) + 1
    (dropped_id, reason), = report.steps[0].samples
    assert dropped_id == "ex100" and reason.endswith("similar to ex0")
    # A low enough threshold catches the half-copy too; a threshold of 1 only exact shingle-set matches.
    kept_low, _ = run_filters(examples + [edited, half], [NearDedup(0.2)])
    assert half not in kept_low
    assert edited in run_filters(examples + [edited], [NearDedup(1.0)])[0]


# -------------------------------------------------------------------------------------------- importer
def _write_mixed_source(path: Path, data_dir: Path) -> list[dict]:
    """Exemplar rows of three languages in three row shapes, plus defects each filter must catch."""
    en, zh, fr = (exemplar_rows(data_dir, lang) for lang in ("en", "zh", "fr"))
    rows: list[dict] = []
    rows += en  # instruction/response
    rows += [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["response"]}]} for r in zh]  # fmt: skip
    rows += [{"conversations": [{"from": "human", "value": r["instruction"]},
                                {"from": "gpt", "value": r["response"]}]} for r in fr]  # fmt: skip
    rows += [
        {"instruction": "What is 2 + 2?", "response": "4"},  # not well-formed
        {"instruction": "What is 2 + 2?", "response": format_answer("2 + 2 = 4", "4")},  # too short
        {"instruction": en[0]["instruction"], "response": en[0]["response"]},  # exact duplicate
        {"instruction": en[1]["instruction"].replace("computers", "computer"), "response": en[1]["response"]},
        {"prompt_only": "no answer here"},  # unparseable
    ]
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.write("{not json\n")
    return rows


def _check_report(report: FilterReport) -> None:
    by = {s.name: s for s in report.steps}
    assert [s.name for s in report.steps] == ["parse", "well_formed", "length", "language", "exact_dedup", "near_dedup"]
    assert report.total == 30 and by["parse"].removed == 2
    assert by["well_formed"].removed == 1 and by["length"].removed == 1
    assert by["language"].removed == 8  # the French rows
    assert by["exact_dedup"].removed == 1 and by["near_dedup"].removed == 1
    # Samples name the source row: 26 repeats row 0, 27 is row 1 with one word changed.
    assert by["exact_dedup"].samples == [("row 26", "same as row 0")]
    assert by["near_dedup"].samples[0][0] == "row 27" and by["near_dedup"].samples[0][1].endswith("similar to row 1")
    assert by["well_formed"].samples == [("row 24", "<Thought> appears 0 times")]
    assert report.kept == 16
    for s in report.steps[1:]:
        assert s.seen == report.steps[report.steps.index(s) - 1].kept


def test_import_jsonl_with_every_filter(tmp_path: Path, data_dir: Path) -> None:
    src = tmp_path / "openo1.jsonl"
    _write_mixed_source(src, data_dir)
    result = import_cot(src, default_filters(min_chars=60, langs=["en", "zh"]))
    _check_report(result.report)
    assert {e.lang for e in result.examples} == {"en", "zh"}
    for e in result.examples:
        assert e.messages[0] == {"role": "system", "content": system_prompt()}
        assert [m["role"] for m in e.messages] == ["system", "user", "assistant"]
        assert parse_answer(e.answer) is not None and e.source == "import:openo1.jsonl"
    assert len({e.id for e in result.examples}) == len(result.examples)
    assert "invalid JSON" in result.report.steps[0].samples[-1][1]


def test_import_parquet_matches_jsonl(tmp_path: Path, data_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = exemplar_rows(data_dir, "en") + exemplar_rows(data_dir, "de")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cot.parquet")
    with (tmp_path / "cot.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    a = import_cot(tmp_path / "cot.parquet")
    b = import_cot(tmp_path / "cot.jsonl")
    assert [e.messages for e in a.examples] == [e.messages for e in b.examples] and len(a.examples) == 16
    assert import_cot(tmp_path / "cot.parquet", limit=3).report.total == 3


def test_import_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        import_cot(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        import_cot(tmp_path / "x.csv")


# --------------------------------------------------------------------------------------------- exports
def test_saved_dataset_loads_and_trl_accepts_it(tmp_path: Path, data_dir: Path) -> None:
    from datasets import load_from_disk
    from trl.data_utils import is_conversational

    result = import_cot(_source(tmp_path, data_dir))
    save_dataset(result.examples, tmp_path / "sft")
    ds = load_from_disk(str(tmp_path / "sft"))
    assert len(ds) == len(result.examples) and "messages" in ds.column_names
    assert ds[0]["messages"] == result.examples[0].messages and is_conversational(ds[0])
    assert CotExample.from_row(ds[3]) == result.examples[3]

    pairs = [
        PreferencePair(f"p{i}", e.messages[:2], e.answer, format_answer("I am not sure.", "0"), lang=e.lang)
        for i, e in enumerate(result.examples)
    ]
    save_dataset(pairs, tmp_path / "dpo")
    dpo = load_from_disk(str(tmp_path / "dpo"))
    assert {"prompt", "chosen", "rejected"} <= set(dpo.column_names) and is_conversational(dpo[0])
    with pytest.raises(ValueError, match="empty"):
        save_dataset([], tmp_path / "none")


def _source(tmp_path: Path, data_dir: Path) -> Path:
    src = tmp_path / "src.jsonl"
    with src.open("w", encoding="utf-8") as f:
        for lang in ("en", "zh", "ja"):
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in exemplar_rows(data_dir, lang))
    return src


@pytest.mark.slow
def test_trl_trainers_prepare_the_exports(tmp_path: Path, data_dir: Path) -> None:
    """SFTTrainer and DPOTrainer take the saved directories as they are (tiny random model, real tokenizer)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from marco.llm.export import local_model

    examples = import_cot(_source(tmp_path, data_dir)).examples
    save_dataset(examples, tmp_path / "sft")
    save_dataset([PreferencePair(f"p{i}", e.messages[:2], e.answer, format_answer("no idea", "0"))
                  for i, e in enumerate(examples)], tmp_path / "dpo")  # fmt: skip
    tok = AutoTokenizer.from_pretrained(local_model("smollm2"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    common = dict(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, bf16=False, max_steps=1,
                  per_device_train_batch_size=2, gradient_checkpointing=False, max_length=1024)  # fmt: skip
    sft = SFTTrainer(model=LlamaForCausalLM(cfg), args=SFTConfig(**common), train_dataset=load_from_disk(str(tmp_path / "sft")),
                     processing_class=tok)  # fmt: skip
    row = sft.train_dataset[0]
    assert len(sft.train_dataset) == len(examples) and row["input_ids"][: 3] == tok.encode("<|im_start|>system\n")
    assert "<Thought>" in tok.decode(row["input_ids"])
    dpo = DPOTrainer(model=LlamaForCausalLM(cfg), ref_model=LlamaForCausalLM(cfg), args=DPOConfig(**common), train_dataset=load_from_disk(str(tmp_path / "dpo")),
                     processing_class=tok)  # fmt: skip
    assert len(dpo.train_dataset) == len(examples)
    assert dpo.train().training_loss > 0


# ------------------------------------------------------------------------------------------------- CLI
def test_import_cot_cli(tmp_path: Path, data_dir: Path) -> None:
    from typer.testing import CliRunner

    from marco.cli import app

    src = tmp_path / "openo1.jsonl"
    _write_mixed_source(src, data_dir)
    runner = CliRunner()
    res = runner.invoke(app, ["import-cot", str(src), "--min-chars", "60", "--lang", "en,zh", "--json",
                              "--jsonl", str(tmp_path / "kept.jsonl"), "--out", str(tmp_path / "ds")])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.splitlines()[0])
    assert report["kept"] == 16 and [s["removed"] for s in report["steps"]] == [2, 1, 1, 8, 1, 1]
    assert len(read_jsonl(tmp_path / "kept.jsonl")) == 16 and (tmp_path / "ds" / "dataset_info.json").exists()

    table = runner.invoke(app, ["import-cot", str(src), "--near-dup-threshold", "0"])
    assert table.exit_code == 0 and "near_dedup" not in table.stdout and "well_formed" in table.stdout

    bad = runner.invoke(app, ["import-cot", str(tmp_path / "nope.jsonl")])
    assert bad.exit_code == 1 and bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr
    bad = runner.invoke(app, ["import-cot", str(src), "--near-dup-threshold", "1.5"])
    assert bad.exit_code == 1 and "between 0 and 1" in bad.stderr
