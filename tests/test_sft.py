"""SFT: assistant-only loss masks, training data sources, and real SmolLM2 fine-tuning (torchrun, LoRA)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from marco.data import CotExample, chat, format_answer, save_dataset, write_jsonl
from marco.sft import SFTConfig, SFTResult, run_sft
from marco.sft.data import load_chats
from marco.sft.masking import tokenize_chat, tokenize_chats

# A short system prompt keeps the test sequences short; the format is Marco-o1's.
SHORT_SYSTEM = "Think inside <Thought></Thought>, then answer inside <Output></Output>."


def mgsm_cot(data_dir: Path, lang: str = "en", n: int = 8) -> list[CotExample]:
    answers = json.loads((data_dir / "mgsm" / "exemplars.json").read_text())["EXEMPLAR_NUMBER_ANSWERS"]
    with (data_dir / "mgsm" / f"mgsm_exemplars_{lang}.tsv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    out = []
    for i, (q, a) in enumerate(rows):
        q, a = (re.split(r"[:：]", s, maxsplit=1)[-1].strip() for s in (q, a))
        out.append(CotExample(f"{lang}{i}", chat(q, format_answer(a, str(answers[i])), SHORT_SYSTEM), "test", lang))
    return out


@pytest.fixture(scope="module")
def base_dir() -> str:
    from marco.sft.base_model import resolve_base

    return resolve_base("smollm2")


@pytest.fixture(scope="module")
def tokenizer(base_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.slow
def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer, data_dir: Path) -> None:
    example = mgsm_cot(data_dir, n=1)[0]
    ids, mask = tokenize_chat(tokenizer, example.messages)
    assert ids == tokenizer.apply_chat_template(example.messages, tokenize=True, return_dict=False)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == example.answer + "<|im_end|>"
    untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    # The system and user turns, the assistant role header, and the newline the template puts after <|im_end|>.
    prompt = tokenizer.apply_chat_template(example.messages[:2], add_generation_prompt=True, tokenize=False)
    assert untrained == prompt + "\n" and example.question in untrained

    # Two assistant turns: both trained, the user turn between them not.
    turns = [*example.messages, {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": "22"}]
    ids, mask = tokenize_chat(tokenizer, turns)
    spans, start = [], None
    for j, m in enumerate([*mask, 0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            spans.append(tokenizer.decode(ids[start:j]))
            start = None
    assert spans == [example.answer + "<|im_end|>", "22<|im_end|>"]

    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_chat(tokenizer, example.messages[:2])
    # Truncation that leaves no assistant token drops the example.
    n_prompt = mask.index(1)
    cols = tokenize_chats(tokenizer, [example.messages, turns], max_length=n_prompt)
    assert cols["input_ids"] == []
    cols = tokenize_chats(tokenizer, [example.messages], max_length=n_prompt + 3)
    assert len(cols["input_ids"][0]) == n_prompt + 3 and sum(cols["assistant_masks"][0]) == 3


# ------------------------------------------------------------------------------------------- data sources
def test_load_chats_from_every_source(tmp_path: Path, data_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    examples = mgsm_cot(data_dir, n=4)
    write_jsonl(examples, tmp_path / "a.jsonl")
    save_dataset(examples, tmp_path / "ds")
    rows = [{"instruction": e.question, "response": e.answer} for e in examples]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    want = [e.messages for e in examples]
    assert load_chats(tmp_path / "a.jsonl") == want
    assert load_chats(tmp_path / "ds") == want
    from_parquet = load_chats(tmp_path / "a.parquet")  # instruction/response rows get the Marco system prompt
    assert [m[1:] for m in from_parquet] == [m[1:] for m in want] and from_parquet[0][0]["role"] == "system"
    assert len(load_chats(tmp_path / "a.jsonl", limit=2)) == 2

    with (tmp_path / "a.jsonl").open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="row 4 is not a chat"):
        load_chats(tmp_path / "a.jsonl")
    with pytest.raises(FileNotFoundError, match="no training data"):
        load_chats(tmp_path / "missing.jsonl")


def test_gold_cot_source_is_made_on_the_fly_from_a_training_split(tmp_path: Path) -> None:
    from marco.sft.config import SFTConfig
    from marco.tasks.arith import gold_cot_rows

    # what `marco data gold-cot` writes, read back, equals the source made on the fly
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gold_cot_rows("arith-train", 40000, 3)))
    chats = load_chats("gold-cot:arith-train?start=40000&limit=3")
    assert chats == load_chats(tmp_path / "gold.jsonl") and len(chats) == 3
    assert chats[0][-1]["role"] == "assistant" and chats[0][-1]["content"].rstrip().endswith("</Output>")
    assert chats != load_chats("gold-cot:arith-train?start=40001&limit=3")
    assert len(load_chats("gold-cot:arith-train?limit=2")) == 2
    # a weight after the spec, as `--source` takes it
    config = SFTConfig(sources=["gold-cot:arith-train?start=0&limit=8:0.5"], base="smollm2", output_dir=str(tmp_path))
    assert config.sources == [{"path": "gold-cot:arith-train?start=0&limit=8", "weight": 0.5}]
    with pytest.raises(ValueError, match="evaluation split"):
        load_chats("gold-cot:arith-heldout?limit=2")
    for bad in ("gold-cot:arith-train?begin=3", "gold-cot:arith-train?limit=0", "gold-cot:arith-train?start=x"):
        with pytest.raises(ValueError, match="expected gold-cot:SPLIT"):
            load_chats(bad)


def test_config_validation_and_round_trip(tmp_path: Path) -> None:
    config = SFTConfig(data="x.jsonl", lora=True, nproc=2, max_steps=3)
    config.to_json(tmp_path / "c.json")
    assert SFTConfig.from_json(tmp_path / "c.json") == config
    assert "data" not in config.hyperparameters() and config.hyperparameters()["lora"] is True
    for bad in ({"batch_size": 0}, {"nproc": 0}, {"learning_rate": 0.0}, {"lora": True, "lora_r": 0},
                {"eval_fraction": 0.6}, {"max_steps": 0}, {"epochs": 0}, {"sources": [{"path": "y", "weight": 0}]},
                {"sources": ["y.jsonl"]}):  # data and sources together
        with pytest.raises(ValueError):
            SFTConfig(data="x.jsonl", **bad)
    # issue 15: a run lasts epochs OR steps; max_steps no longer silently overrides epochs
    with pytest.raises(ValueError, match="not both"):
        SFTConfig(data="x.jsonl", epochs=3, max_steps=100)
    assert SFTConfig(data="x.jsonl").train_epochs == 2.0 and SFTConfig(data="x.jsonl", max_steps=5).train_epochs is None
    assert SFTConfig(data="x.jsonl", epochs=3).hyperparameters()["epochs"] == 3
    # records written before the rule keep their meaning (max_steps won when it was > 0)
    assert SFTConfig.from_dict({"data": "x", "max_steps": 100, "epochs": 1.0}).max_steps == 100
    assert SFTConfig.from_dict({"data": "x", "max_steps": 0, "epochs": 3.0}).train_epochs == 3.0
    # sources: PATH[:WEIGHT] strings or dicts; a synthesis: prefix is not a weight
    mixed = SFTConfig(sources=["a.jsonl:2", {"path": "synthesis:r1"}, "synthesis:r2:0.5"])
    assert mixed.mix == [{"path": "a.jsonl", "weight": 2.0}, {"path": "synthesis:r1", "weight": 1.0},
                         {"path": "synthesis:r2", "weight": 0.5}]
    assert SFTConfig(data="x.jsonl").mix == [{"path": "x.jsonl", "weight": 1.0}]
    with pytest.raises(FileNotFoundError, match="no training data"):
        run_sft(SFTConfig(data=str(tmp_path / "missing.jsonl"), output_dir=str(tmp_path / "o")))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "only a question"}) + "\n")
    with pytest.raises(ValueError, match="row 0 is not a chat"):
        run_sft(SFTConfig(data=str(tmp_path / "bad.jsonl"), output_dir=str(tmp_path / "o"), nproc=2))
    assert not (tmp_path / "o").exists()  # nothing was started


def test_sources_mix_by_weight_with_a_held_out_split(tmp_path: Path, data_dir: Path) -> None:
    from marco.sft.data import split_and_mix

    a = mgsm_cot(data_dir, "en", 8)
    b = mgsm_cot(data_dir, "zh", 8)
    write_jsonl(a, tmp_path / "a.jsonl")
    save_dataset(b, tmp_path / "b")
    sources = [{"path": str(tmp_path / "a.jsonl"), "weight": 2.0}, {"path": str(tmp_path / "b"), "weight": 0.5}]
    train, held, report = split_and_mix(sources, eval_fraction=0.25, seed=1)
    assert [(r["examples"], r["eval"], r["train"]) for r in report] == [(8, 2, 12), (8, 2, 3)]
    assert len(train) == 15 and len(held) == 4
    key = lambda m: m[1]["content"]  # noqa: E731
    a_q, b_q = {key(e.messages) for e in a}, {key(e.messages) for e in b}
    assert sum(key(m) in a_q for m in train) == 12 and sum(key(m) in b_q for m in train) == 3
    # the held-out chats never appear in training, whatever the weights
    assert not {key(m) for m in held} & {key(m) for m in train}
    assert split_and_mix(sources, 0.25, seed=1)[0] == train  # seeded
    assert split_and_mix(sources, 0.0, seed=1)[1] == []


@pytest.mark.slow
def test_only_assistant_tokens_carry_loss_through_the_real_trainer(tmp_path: Path, data_dir: Path, base_dir: str) -> None:
    """End to end: a real chat, the real tokenizer, TRL's own dataset preparation and collator: the labels
    that are not -100 are exactly the assistant turns' tokens (and their end-of-turn token)."""
    from marco.sft.train import build_trainer

    examples = mgsm_cot(data_dir, "zh", 2)
    two_turns = [*examples[1].messages, {"role": "user", "content": "再乘以二呢？"},
                 {"role": "assistant", "content": "<Thought>\n2 × 6 = 12\n</Thought>\n<Output>\n12\n</Output>"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"messages": m}, ensure_ascii=False)
                                               for m in (examples[0].messages, two_turns)) + "\n")
    config = SFTConfig(data=str(tmp_path / "c.jsonl"), base_path=base_dir, output_dir=str(tmp_path / "o"),
                       max_steps=1, batch_size=2, max_length=1024, eval_fraction=0.0)  # fmt: skip
    trainer, tok = build_trainer(config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert len(batch["labels"]) == 2
    spans_seen = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [(j, t) for j, (t, lab) in enumerate(zip(ids, labels)) if lab != -100]
        assert all(labels[j] == t for j, t in trained)
        spans, start = [], None
        for j, lab in enumerate([*labels, -100]):
            if lab != -100 and start is None:
                start = j
            elif lab == -100 and start is not None:
                spans.append(tok.decode(ids[start:j]))
                start = None
        spans_seen.append(spans)
    want = sorted([[examples[0].answer + "<|im_end|>"],
                   [examples[1].answer + "<|im_end|>", two_turns[-1]["content"] + "<|im_end|>"]], key=len)
    assert sorted(spans_seen, key=len) == want
    # nothing of the system prompt, the questions or the role headers carries loss
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        text = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert "<|im_start|>" not in text and SHORT_SYSTEM not in text and "再乘以二呢" not in text


# ------------------------------------------------------------------------------------------ real training
def _weights(path: str):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
def test_sft_under_torchrun_two_processes(tmp_path: Path, data_dir: Path, base_dir: str) -> None:
    """Full fine-tuning, 2 gloo ranks: the data is sharded, the loss goes down, the checkpoint generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = mgsm_cot(data_dir, n=4)
    write_jsonl(examples, tmp_path / "train.jsonl")
    registered: list[SFTResult] = []
    # 4 examples over 2 ranks × 1 per step: steps 1-2 are one epoch, steps 3-4 see the same examples again.
    config = SFTConfig(
        data=str(tmp_path / "train.jsonl"), base="smollm2", output_dir=str(tmp_path / "out"), nproc=2,
        max_steps=4, batch_size=1, max_length=160, learning_rate=1e-4, lr_scheduler="constant", run_id="t1",
    )  # fmt: skip
    result = run_sft(config, on_checkpoint=registered.append)

    assert registered == [result] and result.lineage()["base"] == "smollm2"
    assert result.metrics["world_size"] == 2 and result.metrics["steps"] == 4 and len(result.losses) == 4
    assert sum(result.losses[2:]) < sum(result.losses[:2]), result.losses
    # Sharding: one epoch (2 steps × 2 ranks) saw every example once, so it counted every token once.
    tok = AutoTokenizer.from_pretrained(base_dir)
    lengths = [len(ids) for ids in tokenize_chats(tok, [e.messages for e in examples], 160)["input_ids"]]
    assert len(set(lengths)) == 4 and max(lengths) < 160  # distinct and untruncated, so the sums tell shards apart
    assert sum(result.step_tokens[:2]) == sum(lengths) == sum(result.step_tokens[2:])
    assert result.tokens_per_s > 0 and result.metrics["tokens"] == 2 * sum(lengths)

    out = Path(result.checkpoint)
    assert json.loads((out / "losses.json").read_text()) == result.losses
    assert (out / "metrics.json").exists() and (out / "train.log").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    base, tuned = _weights(base_dir), _weights(str(out))
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(examples[0].messages[:2], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)  # fmt: skip
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1] and tok.decode(gen[0, prompt["input_ids"].shape[1]:]).strip()


@pytest.mark.slow
def test_sft_cli_lora_in_process(tmp_path: Path, data_dir: Path, base_dir: str) -> None:
    """`marco sft --lora`: adapters trained, merged into a checkpoint transformers loads; bad input exits 1."""
    import torch
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from marco.cli import app

    save_dataset(mgsm_cot(data_dir, n=4), tmp_path / "ds")
    out = tmp_path / "lora"
    runner = CliRunner()
    res = runner.invoke(app, ["sft", "--data", str(tmp_path / "ds"), "--base", "smollm2", "--lora", "--lora-r", "4",
                              "--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--lr", "1e-3",
                              "--out", str(out), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(payload["losses"]) == 2 and payload["metrics"]["world_size"] == 1
    assert 0 < payload["metrics"]["trainable_params"] < 0.05 * 134_515_008
    ckpt = Path(payload["checkpoint"])
    assert ckpt.parent == out.resolve() and ckpt.name.startswith("claim-")  # the claim's own folder under --out
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(ckpt)  # merged: a plain checkpoint
    base, tuned = _weights(base_dir), _weights(str(ckpt))
    assert set(base) == set(tuned)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all("proj" in k for k in changed)  # LoRA touched the linear layers only

    again = runner.invoke(app, ["sft", "--data", str(tmp_path / "ds"), "--out", str(out)])
    assert again.exit_code == 1 and "already holds a checkpoint" in again.stderr
    missing = runner.invoke(app, ["sft", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "no training data" in missing.stderr and missing.stderr.count("\n") == 1


@pytest.mark.slow
def test_dpo_stage_trains_on_whole_path_and_step_pairs(tmp_path: Path, base_dir: str) -> None:
    """The optional DPO stage: real SmolLM2, a whole-path pair and a sibling-step pair, 2 steps."""
    import torch

    from marco.data.examples import PreferencePair
    from marco.sft import DPOConfig, run_dpo
    from marco.sft.dpo import load_pairs, tokenize_pair
    from transformers import AutoTokenizer

    q = "Mia has 30 cards and gets 49 more. How many cards does she have?"
    pairs = [
        PreferencePair("a", chat(q, system=SHORT_SYSTEM), format_answer("30 + 49 = 79", "79"),
                       format_answer("30 + 49 = 80", "80")),
        PreferencePair("b", chat(q, system=SHORT_SYSTEM), "30 + 49 = 79.\n", "30 - 49 = -19.\n",
                       meta={"kind": "step", "prefix": "<Thought>\nMia starts with 30 cards. "}),
    ]  # fmt: skip
    save_dataset(pairs, tmp_path / "pairs")
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = load_pairs(tmp_path / "pairs")
    whole, step = tokenize_pair(tok, rows[0]), tokenize_pair(tok, rows[1])
    assert tok.decode(whole["chosen_ids"]).endswith("<|im_end|>")  # a whole answer ends its turn
    assert tok.decode(step["chosen_ids"]) == "30 + 49 = 79.\n"  # a step continues the thought: no end token
    assert tok.decode(step["prompt_ids"]).endswith("<|im_start|>assistant\n<Thought>\nMia starts with 30 cards. ")

    with pytest.raises(ValueError, match="not both"):
        DPOConfig(pairs="p", epochs=1, max_steps=1)
    assert run_dpo  # the CLI below runs it

    # `marco dpo`: trains, saves, records the run and registers the checkpoint with its lineage
    from typer.testing import CliRunner

    from marco.cli import app
    from marco.store import Store

    runner, db = CliRunner(), f"sqlite:///{tmp_path / 'dpo.db'}"
    res = runner.invoke(app, ["dpo", "--pairs", str(tmp_path / "pairs"), "--base", "smollm2", "--out",
                              str(tmp_path / "dpo"), "--max-steps", "2", "--batch-size", "2", "--max-length", "192",
                              "--lr", "1e-5", "--db", db, "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert payload["metrics"]["steps"] == 2 and len(payload["losses"]) == 2 and payload["metrics"]["step_pairs"] == 1
    assert payload["losses"][0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step: log 2
    store = Store.open(db)
    run = store.get_training_run(payload["training_run"])
    assert run.status == "done" and run.losses == payload["losses"] and run.n_examples == 2
    model = store.get_checkpoint(payload["model"])
    assert model.meta["stage"] == "dpo" and model.meta["hyperparameters"]["beta"] == 0.1 and model.parent_id
    base, tuned = _weights(base_dir), _weights(payload["checkpoint"])
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    store.close()
    # bad input: one line, exit 1, no model loaded
    again = runner.invoke(app, ["dpo", "--pairs", str(tmp_path / "pairs"), "--base", "smollm2", "--out", str(tmp_path / "dpo"), "--db", db])
    assert again.exit_code == 1 and "already holds a checkpoint" in again.stderr
    for args, said in ((["--pairs", str(tmp_path / "nope.jsonl")], "no preference pairs"),
                       (["--pairs", str(tmp_path / "pairs"), "--epochs", "1", "--max-steps", "2"], "not both")):
        bad = runner.invoke(app, ["dpo", "--base", "smollm2", "--out", str(tmp_path / "x"), "--db", db, *args])
        assert bad.exit_code == 1 and said in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


@pytest.mark.slow
def test_compact_lm_head_equals_trls_fused_head_on_the_real_model(tmp_path: Path, data_dir: Path, base_dir: str) -> None:
    """On a CPU the product's SFT scores only labelled positions (marco.sft.lm_head); its loss, gradients and the
    metrics TRL logs (entropy, top-1 accuracy) equal TRL's own fused head on the same batch, and it leaves a
    model whose logits are transformed after the head to TRL."""
    import torch

    from marco.sft.lm_head import add_compact_lm_head, compact_head_applies
    from marco.sft.train import build_trainer

    write_jsonl(mgsm_cot(data_dir, "en", 8), tmp_path / "a.jsonl")
    seen = {}
    for compact in (False, True):
        config = SFTConfig(data=str(tmp_path / "a.jsonl"), base="smollm2", output_dir=str(tmp_path / "out"),
                           max_steps=1, batch_size=4, max_length=256, eval_fraction=0.0, compact_lm_head=compact)  # fmt: skip
        config.base_path = base_dir
        trainer, _ = build_trainer(config)
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompt tokens carry no loss
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grad = trainer.model.model.layers[3].mlp.up_proj.weight.grad.clone()
        with torch.no_grad():
            out = trainer.model(**batch, fused_lm_head=True)
        seen[compact] = (loss.item(), grad, out.entropy, out.is_top1, out.label_mask)
    (l0, g0, e0, t0, m0), (l1, g1, e1, t1, m1) = seen[False], seen[True]
    assert l1 == pytest.approx(l0, rel=1e-4) and torch.equal(m0, m1)
    assert (g1 - g0).abs().max() <= 1e-3 * g0.abs().max()
    assert (e1 - e0).abs().max() < 1e-3 and torch.equal(t0, t1)
    assert (e1[~m1] == 0).all() and not t1[~m1].any()  # zero where no label, as TRL's fields are

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    assert compact_head_applies(model)
    model.config.final_logit_softcapping = 30.0  # a Gemma-style head: TRL applies it, this head would not
    forward = model.forward
    assert not compact_head_applies(model) and add_compact_lm_head(model) is False and model.forward == forward
