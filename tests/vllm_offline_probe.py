"""Run by tests/test_vllm_real.py with the vLLM environment's Python: vLLM's offline engine in this process
(``VLLMBackend``, what ``vllm:MODEL`` is where vLLM is importable) on the bundled model. Prints one JSON
object with what the test compares, then exits: the test also checks that it does exit, leaving no engine
process behind (``marco solve --model vllm:DIR --json`` used to print and hang).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.llm.base import GenerationRequest  # noqa: E402
from marco.llm.vllm_engine import VLLMBackend, VLLMSettings  # noqa: E402


def gen_dict(g):  # type: ignore[no-untyped-def]
    return {"token_ids": g.token_ids, "logprobs": g.logprobs, "top_ids": g.top_ids, "top_logprobs": g.top_logprobs,
            "finish": g.finish_reason, "text": g.text}


def main() -> None:
    questions = json.loads(sys.argv[1])
    b = VLLMBackend.load("smollm2", name="vllm:smollm2", settings=VLLMSettings(max_rows=16))
    prompts = [b.apply_chat_template([{"role": "user", "content": q}], "<Thought>\n") for q in questions]
    together = [g[0] for g in b.generate([GenerationRequest(p, 32) for p in prompts])]
    alone = [b.generate([GenerationRequest(p, 32)])[0][0] for p in prompts]
    sampled = b.generate([GenerationRequest(prompts[0], 12, temperature=1.0, n=3, seed=11),
                          GenerationRequest(prompts[0], 12, temperature=1.0, n=1, seed=11)])
    stopped = b.generate([GenerationRequest(prompts[0], 32, stop=(" ",))])[0][0]
    out = {"prompts": prompts, "together": [gen_dict(g) for g in together], "alone": [gen_dict(g) for g in alone],
           "sampled_n3": [g.token_ids for g in sampled[0]], "sampled_n1": sampled[1][0].token_ids,
           "stopped": gen_dict(stopped)}
    print("PROBE " + json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps the child from running main()
    main()
