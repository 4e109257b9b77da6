"""The Marco-o1 system prompt and its ``<Thought>…</Thought><Output>…</Output>`` answer format.

A completion in this format thinks inside ``<Thought>`` and answers inside ``<Output>``. The search primes
the assistant turn with :data:`ASSISTANT_PREFIX`, so generated text usually starts *inside* the thought
and carries no opening ``<Thought>`` tag; the helpers here accept both forms, unclosed tags (generation
stopped by :data:`OUTPUT_END` or by the token limit) and any tag case.
"""

from __future__ import annotations

import re

THOUGHT_START = "<Thought>"
THOUGHT_END = "</Thought>"
OUTPUT_START = "<Output>"
OUTPUT_END = "</Output>"

# Marco-o1's own system prompt (AIDC-AI/Marco-o1), kept verbatim for fidelity with Qwen2-based models.
MARCO_O1_SYSTEM_PROMPT = (
    "你是一个经过良好训练的AI助手，你的名字是Marco-o1.由阿里国际数字商业集团的AI Business创造.\n"
    "## 重要！！！！！\n"
    "当你回答问题时，你的思考应该在<Thought>内完成，<Output>内输出你的结果。\n"
    "<Thought>应该尽可能是英文，但是有2个特例，一个是对原文中的引用，另一个是是数学应该使用markdown格式，"
    "<Output>内的输出需要遵循用户输入的语言。\n"
)

# The same rules in English: the default model (SmolLM2-135M-Instruct) only understands English.
SYSTEM_PROMPT = (
    "You are a well-trained AI assistant.\n"
    "## Important!\n"
    "When you answer a question, do your thinking inside <Thought></Thought> and give your result inside "
    "<Output></Output>.\n"
    "The <Thought> should be in English as far as possible, with two exceptions: quotations from the original "
    "text, and mathematics, which should use markdown. The <Output> must follow the language of the user's "
    "input.\n"
)

ASSISTANT_PREFIX = THOUGHT_START + "\n"

# Stop string that ends a completed answer (backends drop it from the returned text).
STOPS: tuple[str, ...] = (OUTPUT_END,)

_THOUGHT_START = re.compile(r"^\s*<thought>", re.IGNORECASE)
_THOUGHT_END = re.compile(r"</thought>", re.IGNORECASE)
_OUTPUT_START = re.compile(r"<output>", re.IGNORECASE)
_OUTPUT_END = re.compile(r"</output>", re.IGNORECASE)
_PARTIAL_TAG = re.compile(r"</?[A-Za-z]{0,8}$")
# ChatML-style special tokens (<|im_end|>, <|endoftext|>, ...), whatever the tokenizer
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>")


def system_prompt(style: str = "english") -> str:
    """The system prompt by style: ``english`` (default) or ``marco-o1`` (the original Chinese one)."""
    if style == "english":
        return SYSTEM_PROMPT
    if style == "marco-o1":
        return MARCO_O1_SYSTEM_PROMPT
    raise ValueError(f"unknown system prompt style {style!r}; choose 'english' or 'marco-o1'")


def chat(user: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages: the system prompt, then ``user``."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def split_thought_output(text: str) -> tuple[str, str | None]:
    """Split a completion into ``(thought, output)``; ``output`` is None when there is no ``<Output>``.

    The output is the content of the *last* ``<Output>`` (an answer given after a reflection replaces an
    earlier one), up to ``</Output>`` or the end of the text. The thought is what precedes it, without the
    tags. Both parts are stripped of surrounding whitespace.
    """
    body = _THOUGHT_START.sub("", text, count=1)
    starts = list(_OUTPUT_START.finditer(body))
    output: str | None = None
    if starts:
        last = starts[-1]
        head, output = body[: last.start()], body[last.end():]
        end = _OUTPUT_END.search(output)
        # a sample cut off by its token budget can end inside the closing tag ("42</Outp")
        output = output[: end.start()] if end else _PARTIAL_TAG.sub("", output)
        output = output.strip()
    else:
        head = body
    closes = list(_THOUGHT_END.finditer(head))
    thought = head[: closes[-1].start()] if closes else head
    return thought.strip(), output


def strip_special_tokens(text: str, specials: tuple[str, ...] | list[str] = ()) -> str:
    """``text`` without tokenizer special tokens: every ``<|...|>`` marker and each of ``specials`` (a
    tokenizer's ``all_special_tokens``), so an end-of-sequence token never reaches an extracted answer."""
    for token in specials:
        if token and token.strip():
            text = text.replace(token, "")
    return _SPECIAL_TOKEN.sub("", text)


def output_text(text: str) -> str | None:
    """The content of the completion's ``<Output>``, or None when it has none."""
    return split_thought_output(text)[1]


def after_thought(text: str) -> str | None:
    """Whatever follows the last ``</Thought>`` (tags removed), or None when the thought never closed."""
    closes = list(_THOUGHT_END.finditer(text))
    if not closes:
        return None
    rest = text[closes[-1].end():]
    rest = _OUTPUT_END.sub("", _OUTPUT_START.sub("", rest))
    return rest.strip()


def thought_closed(text: str) -> bool:
    """True once the model has left the thought: it wrote ``</Thought>`` or started an ``<Output>``."""
    return bool(_THOUGHT_END.search(text) or _OUTPUT_START.search(text))


def format_completion(thought: str, output: str) -> str:
    """A whole assistant message in Marco-o1's format (e.g. for CoT training data), opening tag included."""
    return f"{ASSISTANT_PREFIX}{thought.strip()}\n{THOUGHT_END}\n{OUTPUT_START}\n{output.strip()}\n{OUTPUT_END}"
