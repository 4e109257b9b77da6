"""Data that travels with the project: the packaged MGSM and FLORES-200, their checksums and licences, the
``--data-dir`` override, WMT22 through sacrebleu (cache, offline error) and ``marco data list``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.store import Store
from marco.tasks import MGSM, DataError, Translation, catalog, get_task
from marco.tasks import data as task_data
from marco.tasks import packaged, sacrebleu_data
from marco.tasks.translation import FLORES_DIR

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MARCO_DATA_DIR", raising=False)


# ---- what ships, and its checksums ---------------------------------------------------------------------


def test_every_shipped_file_is_in_the_manifest_and_matches(data_dir: Path) -> None:
    manifest = packaged.read_manifest()
    shipped = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert shipped == set(manifest)
    assert all(packaged.verify_all().values())
    # each dataset carries its licence text and its attribution; WMT22 (research use only) never ships
    for folder in ("mgsm", f"translation/{FLORES_DIR}"):
        assert {"LICENSE", "SOURCE.md"} <= {Path(p).name for p in manifest if p.startswith(folder + "/")}
    assert "CC BY 4.0" in (data_dir / "mgsm" / "SOURCE.md").read_text(encoding="utf-8")
    assert "Attribution 4.0 International" in (data_dir / "mgsm" / "LICENSE").read_text(encoding="utf-8")
    assert "Attribution-ShareAlike 4.0" in (data_dir / "translation" / FLORES_DIR / "LICENSE").read_text(encoding="utf-8")
    assert not [p for p in manifest if "wmt" in p.lower() or "generaltest" in p]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the upstream copies) not beside the repository")
def test_shipped_files_are_the_upstream_files() -> None:
    """The checksums the shared data's SOURCE.md files record for their upstream copies are ours."""
    manifest = packaged.read_manifest()
    checked = 0
    for source_md, prefix in ((SHARED / "mgsm" / "SOURCE.md", "mgsm/"),
                              (SHARED / "translation" / FLORES_DIR / "SOURCE.md", f"translation/{FLORES_DIR}/")):  # fmt: skip
        for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", source_md.read_text(encoding="utf-8"), re.M):
            assert manifest[prefix + name] == digest, name
            checked += 1
    assert checked == 24 + 5


def test_a_damaged_packaged_file_fails_loading_with_a_clear_error(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "datasets"
    shutil.copytree(data_dir, copy)
    monkeypatch.setattr(task_data, "PACKAGED_DIR", copy)
    assert len(MGSM().load(None, ["en"], None)) == 250  # an intact copy loads
    tsv = copy / "mgsm" / "mgsm_zh.tsv"
    original = tsv.read_text(encoding="utf-8")
    tsv.write_text(original.replace("\t18\n", "\t180\n", 1), encoding="utf-8")  # one reference answer altered
    assert tsv.read_text(encoding="utf-8") != original
    with pytest.raises(DataError, match=r"mgsm_zh.tsv fails its SHA-256 check .* reinstall marco"):
        MGSM().load(None, ["zh"], 1)
    flores = copy / "translation" / FLORES_DIR / "eng_Latn.devtest"
    flores.write_bytes(flores.read_bytes() + b"extra\n")
    with pytest.raises(DataError, match="eng_Latn.devtest fails its SHA-256 check"):
        Translation().load(None, None, 1)
    # the CLI says so in one line, and `marco data list` names the damaged file
    out = runner.invoke(app, ["run", "--dataset", "mgsm", "--lang", "zh", "--model", "scripted", "--db",
                              f"sqlite:///{tmp_path / 'm.db'}"])  # fmt: skip
    assert out.exit_code == 1 and "fails its SHA-256 check" in out.output and "Traceback" not in out.output
    listed = runner.invoke(app, ["data", "list"])
    assert listed.exit_code == 1 and "mgsm/mgsm_zh.tsv" in listed.output


# ---- defaults and the override --------------------------------------------------------------------------


def test_defaults_need_no_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mgsm = MGSM().load(None, ["en", "zh"], 3)
    assert [(p.lang, p.index) for p in mgsm] == [("en", 0), ("en", 1), ("en", 2), ("zh", 0), ("zh", 1), ("zh", 2)]
    first = (task_data.PACKAGED_DIR / "mgsm" / "mgsm_en.tsv").read_text(encoding="utf-8").splitlines()[0]
    assert mgsm[0].question == first.rsplit("\t", 1)[0].strip()
    flores = get_task("translation").load(None, None, 2)
    assert [p.dataset for p in flores] == ["flores200", "flores200"] and flores[0].references[0].startswith('"We now')


def test_data_dir_overrides_the_packaged_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mgsm").mkdir()
    (tmp_path / "mgsm" / "mgsm_en.tsv").write_text("What is 2 + 3?\t5\n", encoding="utf-8")
    (only,) = MGSM().load(str(tmp_path), None, None)
    assert only.question == "What is 2 + 3?"
    monkeypatch.setenv("MARCO_DATA_DIR", str(tmp_path))
    assert [p.question for p in MGSM().load(None, None, None)] == ["What is 2 + 3?"]
    with pytest.raises(DataError, match="mgsm_zh.tsv not found"):  # an override is not silently mixed
        MGSM().load(None, ["zh"], None)
    with pytest.raises(DataError, match=r"does not exist.*leave it unset to use the data shipped with marco"):
        MGSM().load(str(tmp_path / "nope"), None, None)


def test_run_and_submit_use_the_packaged_data_or_the_override(tmp_path: Path, db_url: str, monkeypatch) -> None:
    monkeypatch.delenv("MARCO_BROKER_URL", raising=False)  # submit runs the jobs in-process
    monkeypatch.chdir(tmp_path)
    out = runner.invoke(app, ["run", "--dataset", "translation", "--limit", "2", "--model", "scripted",
                              "--strategy", "greedy", "--db", db_url])  # fmt: skip
    assert out.exit_code == 0, out.output
    (tmp_path / "own" / "mgsm").mkdir(parents=True)
    (tmp_path / "own" / "mgsm" / "mgsm_en.tsv").write_text("Own question one?\t1\nOwn question two?\t2\n", encoding="utf-8")
    sub = runner.invoke(app, ["submit", "mgsm", "--data-dir", str(tmp_path / "own"), "--model", "scripted",
                              "--strategy", "greedy", "--db", db_url])  # fmt: skip
    assert sub.exit_code == 0, sub.output
    sub2 = runner.invoke(app, ["submit", "mgsm", "--lang", "de", "--limit", "2", "--model", "scripted",
                               "--strategy", "greedy", "--db", db_url])  # fmt: skip
    assert sub2.exit_code == 0, sub2.output
    ids = [re.search(r"batch ([0-9a-f-]{36})", o.output).group(1) for o in (out, sub, sub2)]  # type: ignore[union-attr]
    store = Store.open(db_url)
    try:
        rows = [store.batch_rows(batch_id) for batch_id in ids]
    finally:
        store.close()
    assert sorted((p.dataset, p.index) for _, p in rows[0]) == [("flores200", 0), ("flores200", 1)]
    assert sorted(p.question for _, p in rows[1]) == ["Own question one?", "Own question two?"]
    de = (task_data.PACKAGED_DIR / "mgsm" / "mgsm_de.tsv").read_text(encoding="utf-8").splitlines()[:2]
    assert sorted(p.question for _, p in rows[2]) == sorted(line.rsplit("\t", 1)[0].strip() for line in de)
    assert all(s.status == "done" for r in rows for s, _ in r)


# ---- WMT22 ------------------------------------------------------------------------------------------------


def test_testset_option_is_checked() -> None:
    out = runner.invoke(app, ["run", "--dataset", "mgsm", "--testset", "wmt22", "--model", "scripted"])
    assert out.exit_code == 1 and "--testset is for --dataset translation" in out.output
    out = runner.invoke(app, ["run", "--dataset", "translation", "--testset", "wmt19", "--model", "scripted"])
    assert out.exit_code == 1 and "unknown --testset 'wmt19'" in out.output


@pytest.mark.timeout(120)
def test_wmt22_offline_says_what_to_do(tmp_path: Path) -> None:
    """This machine cannot reach sacrebleu's servers: the real downloader fails fast, with one clear line."""
    env = {k: v for k, v in os.environ.items() if k != "MARCO_DATA_DIR"}
    env.update(SACREBLEU=str(tmp_path / "sacrebleu"), MARCO_DOWNLOAD_TIMEOUT="10", PYTHONPATH=str(ROOT), COLUMNS="2000")
    out = subprocess.run(
        [sys.executable, "-c", "from marco.cli import main; main()", "run", "--dataset", "translation", "--testset",
         "wmt22", "--limit", "1", "--model", "scripted", "--db", f"sqlite:///{tmp_path / 'w.db'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=100,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "Traceback" not in text
    assert "WMT22 zh-en is not shipped with marco" in text and "sacrebleu could not download it" in text
    assert "--data-dir DIR" in text and str(tmp_path / "sacrebleu" / "wmt22") in text
    # nothing half-downloaded is left to be mistaken for the test set next time
    assert not list((tmp_path / "sacrebleu").rglob("*.tar.gz"))


def _fake_sacrebleu_cache(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "wmt22.zh-en.src").write_text("你好\n谢谢\n", encoding="utf-8")
    (folder / "wmt22.zh-en.ref-A").write_text("Hello\nThanks\n", encoding="utf-8")
    (folder / "wmt22.zh-en.ref-B").write_text("Hi\nThank you\n", encoding="utf-8")


def test_wmt22_from_sacrebleus_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "sacrebleu" / "wmt22"
    monkeypatch.setattr(sacrebleu_data, "cache_dir", lambda: cache)
    with pytest.raises(DataError, match="not in sacrebleu's cache"):
        Translation(corpus="wmt22").locate(None, download=False)
    _fake_sacrebleu_cache(cache)
    problems = Translation(corpus="wmt22").load(None, None, None)
    assert [(p.dataset, p.question, p.references) for p in problems] == [
        ("wmt22", "你好", ("Hello", "Hi")), ("wmt22", "谢谢", ("Thanks", "Thank you")),
    ]  # fmt: skip
    (wmt,) = [i for i in catalog() if i.name == "wmt22"]
    assert wmt.rows == 2 and wmt.source == f"sacrebleu cache {cache}"


def test_wmt22_data_dir_comes_before_sacrebleu(wmt22_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "sacrebleu" / "wmt22"
    _fake_sacrebleu_cache(cache)
    monkeypatch.setattr(sacrebleu_data, "cache_dir", lambda: cache)
    assert len(Translation(corpus="wmt22").load(str(wmt22_dir.parent.parent), None, None)) == 1875


# ---- marco data list ----------------------------------------------------------------------------------------


def test_data_list_shows_every_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sacrebleu_data, "cache_dir", lambda: tmp_path / "no-cache")
    out = runner.invoke(app, ["data", "list", "--json"])
    assert out.exit_code == 0, out.output
    rows = {(r["name"], r["subset"]): r for r in map(json.loads, out.stdout.splitlines())}
    mgsm = [r for (name, _), r in rows.items() if name == "mgsm"]
    assert len(mgsm) == 11 and {(r["rows"], r["source"], r["licence"]) for r in mgsm} == {(250, "packaged", "CC BY 4.0")}
    flores = rows[("flores200", "zh-en")]
    assert (flores["rows"], flores["source"], flores["licence"]) == (1012, "packaged", "CC BY-SA 4.0")
    wmt = rows[("wmt22", "zh-en")]
    assert wmt["rows"] is None and wmt["source"] == "not available" and "--data-dir" in wmt["note"]
    assert rows[("demo", "en")]["rows"] == 8 and rows[("demo", "en")]["source"] == "built in"
    table = runner.invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "packaged" in table.output and "CC BY-SA 4.0" in table.output


def test_data_list_reads_an_override(wmt22_dir: Path) -> None:
    out = runner.invoke(app, ["data", "list", "--json", "--data-dir", str(wmt22_dir.parent.parent)])
    assert out.exit_code == 0, out.output
    rows = {(r["name"], r["subset"]): r for r in map(json.loads, out.stdout.splitlines())}
    assert rows[("wmt22", "zh-en")]["rows"] == 1875 and rows[("wmt22", "zh-en")]["source"].startswith("data dir ")
    assert rows[("mgsm", "en")]["source"].startswith("data dir ")


def test_data_list_is_built_from_the_task_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task registered without a ``catalog`` method (e.g. a tuning set added later) is listed by loading it."""
    import marco.tasks as tasks
    from marco.tasks.base import Problem

    class Tiny:
        name = "tiny"

        def load(self, data_dir, langs, limit):  # type: ignore[no-untyped-def]
            return [Problem("tiny", "en", i, f"{i} + 1?", (str(i + 1),)) for i in range(3)]

    monkeypatch.setitem(tasks._TASKS, "tiny", Tiny)
    monkeypatch.setattr(tasks, "TASK_NAMES", (*tasks.TASK_NAMES, "tiny"))
    (tiny,) = [i for i in catalog() if i.name == "tiny"]
    assert (tiny.subset, tiny.rows, tiny.source) == ("en", 3, "built in")
