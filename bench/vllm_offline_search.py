"""One MCTS batch on vLLM's offline engine, run by bench/engine_throughput.py with the vLLM environment's Python
(vLLM lives in .venv-vllm on CPU machines). Prints one line ``RESULT {json}``: start-up seconds (engine load),
generated tokens, search seconds, correct answers.

    .venv-vllm/bin/python bench/vllm_offline_search.py PROBLEMS BUDGET ROLLOUT CHILDREN MAX_ROWS
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from marco.llm.base import GenerationRequest
    from marco.llm.vllm_engine import VLLMBackend, VLLMSettings
    from marco.search.driver import LockstepDriver
    from bench.mcts_batch import mcts_batch

    n, budget, rollout, children, rows = (int(x) for x in sys.argv[1:6])
    task, problems, config = mcts_batch(n, budget, rollout, children)
    t = time.perf_counter()
    backend = VLLMBackend.load("smollm2", name="vllm:smollm2", settings=VLLMSettings.from_env(rows))
    backend.generate([GenerationRequest(backend.encode("Hello"), 4)])
    startup = time.perf_counter() - t
    driver = LockstepDriver(backend, task, config)
    t = time.perf_counter()
    results = driver.run(problems)
    secs = time.perf_counter() - t
    print("RESULT " + json.dumps({"startup_s": startup, "tokens": driver.stats.generated_tokens, "secs": secs,
                                  "correct": sum(bool(r.correct) for r in results)}), flush=True)
    backend.close()


if __name__ == "__main__":  # vLLM spawns its engine core
    main()
