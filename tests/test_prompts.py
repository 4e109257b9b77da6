"""The Marco-o1 prompt and the <Thought>/<Output> format helpers."""

from __future__ import annotations

import pytest

from marco import prompts
from marco.prompts import after_thought, format_completion, output_text, split_thought_output, thought_closed


def test_system_prompts_state_the_format() -> None:
    for text in (prompts.SYSTEM_PROMPT, prompts.MARCO_O1_SYSTEM_PROMPT):
        assert "<Thought>" in text and "<Output>" in text
    assert "Marco-o1" in prompts.MARCO_O1_SYSTEM_PROMPT
    assert "language" in prompts.SYSTEM_PROMPT
    assert prompts.system_prompt("marco-o1") is prompts.MARCO_O1_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="english"):
        prompts.system_prompt("klingon")


def test_assistant_prefix_opens_the_thought() -> None:
    assert prompts.ASSISTANT_PREFIX == "<Thought>\n"
    assert not thought_closed(prompts.ASSISTANT_PREFIX + "Step 1: 16 - 3 = 13")


@pytest.mark.parametrize(
    ("text", "thought", "output"),
    [
        ("<Thought>\nA\n</Thought>\n<Output>\nB\n</Output>", "A", "B"),
        ("A\n</Thought>\n<Output>B</Output>", "A", "B"),  # generated after the assistant prefix
        ("A\n</Thought>\n<Output>\nB", "A", "B"),  # stopped at </Output>
        ("A <Output>B</Output>", "A", "B"),  # thought never closed
        ("A\n\nstill thinking", "A\n\nstill thinking", None),
        ("<thought>A</thought><output>B</output>", "A", "B"),  # any tag case
        ("A</Thought><Output>1</Output> Wait! <Output>2</Output>", "A", "2"),  # last output wins
        ("A\n</Thought>\nB without tags", "A", None),
        ("", "", None),
    ],
)
def test_split_thought_output(text: str, thought: str, output: str | None) -> None:
    assert split_thought_output(text) == (thought, output)
    assert output_text(text) == output


def test_thought_closed() -> None:
    assert thought_closed("A\n</Thought>")
    assert thought_closed("A <Output>")
    assert not thought_closed("A\n\nB")


def test_after_thought() -> None:
    assert after_thought("A\n</Thought>\nThe translation.") == "The translation."
    assert after_thought("A\n</Thought>\n<Output>X</Output>") == "X"
    assert after_thought("A only") is None


def test_format_completion_round_trips() -> None:
    text = format_completion(" 9 * 2 = 18 ", "18")
    assert text.startswith(prompts.ASSISTANT_PREFIX)
    assert text.endswith(prompts.OUTPUT_END)
    assert split_thought_output(text) == ("9 * 2 = 18", "18")


def test_chat_messages() -> None:
    messages = prompts.chat("What is 2 + 2?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == prompts.SYSTEM_PROMPT
    assert messages[1]["content"] == "What is 2 + 2?"


def test_an_output_cut_inside_its_closing_tag_loses_the_fragment():
    from marco.prompts import split_thought_output

    assert split_thought_output("<Thought>a</Thought>\n<Output>42</Outp") == ("a", "42")
    assert split_thought_output("<Thought>a</Thought>\n<Output>42<") == ("a", "42")
    assert split_thought_output("<Thought>a</Thought>\n<Output>x < y") == ("a", "x < y")
