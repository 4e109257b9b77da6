"""Loading, prompting and scoring: MGSM, zh→en translation and the demo set."""

from __future__ import annotations

from pathlib import Path

import pytest

from marco import prompts
from marco.tasks import MGSM, TASK_NAMES, DataError, Demo, Translation, default_data_dir, get_task
from marco.tasks.base import Problem
from marco.tasks.mgsm import LANGS
from marco.tasks.translation import FLORES_DIR, WMT_DIR

# ---- registry and data dir ---------------------------------------------------------------------------


def test_get_task_knows_every_dataset() -> None:
    assert isinstance(get_task("mgsm"), MGSM)
    assert isinstance(get_task("translation"), Translation)
    assert isinstance(get_task("demo"), Demo)
    assert get_task("wmt22").corpus == "wmt22"
    with pytest.raises(ValueError, match="unknown dataset 'gsm8k'; choose one of mgsm, translation, demo"):
        get_task("gsm8k")
    for name in TASK_NAMES:
        assert get_task(name).name in ("mgsm", "translation", "demo", "arith", "arith-heldout", "arith-hard", "arith-train")


def test_default_data_dir_is_the_packaged_data_unless_the_environment_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MARCO_DATA_DIR", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    monkeypatch.delenv("MARCO_DATA_DIR")
    monkeypatch.chdir(tmp_path)  # no ../shared anywhere near: the data ships inside the package
    found = Path(default_data_dir())
    assert found == Path(__file__).resolve().parents[1] / "marco" / "datasets"
    assert (found / "mgsm" / "mgsm_en.tsv").is_file() and (found / "translation" / FLORES_DIR).is_dir()


# ---- MGSM --------------------------------------------------------------------------------------------


def test_mgsm_loads_all_eleven_languages(data_dir: Path) -> None:
    problems = MGSM().load(str(data_dir), ["all"], None)
    assert len(problems) == 11 * 250
    assert not [p.error for p in problems if p.error]
    by_lang: dict[str, list[str]] = {}
    for p in problems:
        assert p.dataset == "mgsm" and p.question and len(p.references) == 1
        by_lang.setdefault(p.lang, []).append(p.references[0])
    assert sorted(by_lang) == sorted(LANGS)
    # The answer column is the same in every language, and "2,125" (row 147) is normalised.
    assert all(answers == by_lang["en"] for answers in by_lang.values())
    assert by_lang["en"][146] == "2125"
    assert all(a.lstrip("-").isdigit() for a in by_lang["en"])
    assert len({p.key for p in problems}) == len(problems)


def test_mgsm_languages_limit_and_folders(data_dir: Path) -> None:
    task = MGSM()
    english = task.load(str(data_dir), None, 3)
    assert [(p.lang, p.index) for p in english] == [("en", 0), ("en", 1), ("en", 2)]
    assert english[0].key == "mgsm/en/0"
    both = task.load(str(data_dir / "mgsm"), ["en,zh"], 2)  # the mgsm/ folder itself works too
    assert [(p.lang, p.index) for p in both] == [("en", 0), ("en", 1), ("zh", 0), ("zh", 1)]
    assert both[2].references == english[0].references
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        task.load(str(data_dir), ["xx"], 1)


def test_mgsm_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mgsm_en.tsv not found"):
        MGSM().load(str(tmp_path), None, None)
    with pytest.raises(DataError, match="does not exist"):
        MGSM().load(str(tmp_path / "nope"), None, None)


def test_mgsm_malformed_rows_are_kept_with_a_reason(tmp_path: Path) -> None:
    rows = [
        "\ufeffTwo plus two?\t4",
        "no tab on this line",
        "\t7",
        "What is half of 5?\tfive",
        "",
        'A "quoted" question\twith\ttabs?\t1,250',
    ]
    data = ("\n".join(rows) + "\n").encode() + b"Broken \xff bytes\t3\n"
    (tmp_path / "mgsm_en.tsv").write_bytes(data)
    problems = MGSM().load(str(tmp_path), ["en"], None)
    assert [p.index for p in problems] == [0, 1, 2, 3, 4, 5]  # the blank line is skipped
    good = problems[0]
    assert (good.question, good.references, good.error) == ("Two plus two?", ("4",), None)
    assert problems[1].error == "line 2: expected 'question<TAB>answer', found no tab"
    assert problems[1].question == "no tab on this line"  # nothing is lost
    assert problems[2].error == "line 3: empty question"
    assert problems[3].error == "line 4: answer 'five' is not a number"
    assert problems[3].question == "What is half of 5?"
    assert problems[4].error is None and problems[4].references == ("1250",)
    assert problems[4].question == 'A "quoted" question\twith\ttabs?'
    assert problems[5].error == "line 7: not valid UTF-8"
    task = MGSM()
    assert not task.score("7", problems[2]).correct


def test_mgsm_prompt_is_in_the_problems_language(data_dir: Path) -> None:
    task = MGSM()
    (zh,) = task.load(str(data_dir), ["zh"], 1)
    system, user = task.messages(zh)
    assert system == {"role": "system", "content": prompts.SYSTEM_PROMPT}
    assert user["role"] == "user" and user["content"].startswith(zh.question)
    assert "最终答案" in user["content"] and "<Output>" in user["content"]
    english = MGSM(instructions="english").messages(zh)[1]["content"]
    assert "final answer" in english
    with pytest.raises(ValueError, match="native"):
        MGSM(instructions="both")


def test_mgsm_corpus_accuracy(data_dir: Path) -> None:
    task = MGSM()
    problems = task.load(str(data_dir), ["en"], 4)
    answers = [problems[0].references[0], "-1", None, problems[3].references[0]]
    assert task.corpus_metrics(answers, problems) == {"accuracy": 0.5}
    assert task.corpus_metrics([], []) == {"accuracy": 0.0}
    with pytest.raises(ValueError, match="3 answers for 4 problems"):
        task.corpus_metrics(answers[:3], problems)


# ---- translation -------------------------------------------------------------------------------------


def test_translation_loads_flores(data_dir: Path) -> None:
    problems = Translation().load(str(data_dir / "translation" / FLORES_DIR), None, None)
    assert len(problems) == 1012
    assert {(p.dataset, p.lang, len(p.references)) for p in problems} == {("flores200", "zh-en", 1)}
    assert all(p.error is None and p.question and p.references[0] for p in problems)


def test_translation_loads_wmt_with_two_references(wmt22_dir: Path) -> None:
    problems = Translation().load(str(wmt22_dir), ["zh-en"], None)
    assert len(problems) == 1875
    assert {(p.dataset, len(p.references)) for p in problems} == {("wmt22", 2)}
    assert problems[0].references[0] != problems[0].references[1]
    assert problems[0].meta["domain"] == "conversation"


def test_translation_parent_folders_default_to_flores(data_dir: Path) -> None:
    for folder in (data_dir, data_dir / "translation"):
        assert Translation().load(str(folder), None, 2)[0].dataset == "flores200"
    with pytest.raises(ValueError, match="only has the language pair 'zh-en'"):
        Translation().load(str(data_dir), ["en"], 1)


def test_wmt22_from_a_parent_data_folder(wmt22_dir: Path) -> None:
    for folder in (wmt22_dir.parent.parent, wmt22_dir.parent, wmt22_dir):
        wmt = get_task("wmt22").load(str(folder), None, 2)
        assert [p.dataset for p in wmt] == ["wmt22", "wmt22"] and len(wmt[0].references) == 2


def test_translation_misaligned_or_missing_files(tmp_path: Path) -> None:
    (tmp_path / "zho_Hans.devtest").write_text("一\n二\n三\n", encoding="utf-8")
    (tmp_path / "eng_Latn.devtest").write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(DataError, match="misaligned files: zho_Hans.devtest has 3 lines but eng_Latn.devtest has 2"):
        Translation().load(str(tmp_path), None, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no translation data"):
        Translation().load(str(empty), None, None)


def test_translation_empty_source_line_is_kept_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "zho_Hans.devtest").write_text("一\n\n三\n", encoding="utf-8")
    (tmp_path / "eng_Latn.devtest").write_text("one\ntwo\nthree\n", encoding="utf-8")
    problems = Translation().load(str(tmp_path), None, None)
    assert [p.error for p in problems] == [None, "line 2: empty source sentence", None]


def test_translation_prompt_and_extraction() -> None:
    task = Translation()
    problem = Problem("flores200", "zh-en", 0, "你好", ("Hello",))
    user = task.messages(problem)[1]["content"]
    assert "into English" in user and user.endswith("你好")
    assert task.extract("Think.\n</Thought>\n<Output>\nHello there.\n</Output>", problem) == "Hello there."
    assert task.extract("Think.\n</Thought>\nHello there.", problem) == "Hello there."
    assert task.extract("Literally: hi.\n\nHello there.\n\n", problem) == "Hello there."
    assert task.extract("", problem) is None


def test_translation_scores(data_dir: Path) -> None:
    task = Translation()
    # 100 segments keep the test fast; loading every line is tested above.
    flores = task.load(str(data_dir / "translation" / FLORES_DIR), None, 100)
    perfect = task.corpus_metrics([p.references[0] for p in flores], flores)
    assert perfect["chrf"] == pytest.approx(100.0)
    assert perfect["bleu"] == pytest.approx(100.0)
    shuffled = [p.references[0] for p in flores[1:]] + [flores[0].references[0]]
    worse = task.corpus_metrics(shuffled, flores)
    assert worse["bleu"] < 10.0 and worse["chrf"] < 40.0
    exact = task.score(flores[0].references[0], flores[0])
    assert exact.correct is None and exact.value == pytest.approx(1.0)
    partial = task.score(flores[0].references[0][:20], flores[0]).value
    assert 0.0 < partial < 1.0
    assert task.score(None, flores[0]).value == 0.0


def test_translation_scores_with_two_references(wmt22_dir: Path) -> None:
    task = Translation()
    wmt = task.load(str(wmt22_dir), None, 100)
    for k in (0, 1):  # a hypothesis equal to either reference is perfect
        perfect = task.corpus_metrics([p.references[k] for p in wmt], wmt)
        assert perfect["chrf"] == pytest.approx(100.0) and perfect["bleu"] == pytest.approx(100.0)
