"""vLLM's offline engine in this process: ``--model vllm:MODEL`` (installed by the ``gpu`` extra).

Requests go in as ``TokensPrompt`` (prefixes stay token ids) with ``SamplingParams`` built by the same
mapping as the vLLM server client (:func:`marco.llm.engine_map.vllm_sampling_kwargs`: one engine request per
sample with its derived seed, ``logprobs=5``, stop strings kept in the output). The engine runs with
``logprobs_mode="raw_logprobs"`` (log-softmax of the model's logits, before temperature and top-p) and
prefix caching on. ``generate_continuous`` drives the engine's ``add_request``/``step`` loop itself: a request
whose last sample finishes is handed back at once and the requests that come back join the running batch,
which is vLLM's continuous batching with the search in the loop.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from marco.llm.base import Generation, GenerationRequest
from marco.llm.engine_map import (
    CodecBackend,
    RequestAssembler,
    SampleJob,
    SampleOutput,
    TextCodec,
    from_logprob_dicts,
    normalise_finish,
    vllm_sampling_kwargs,
)


def vllm_available() -> str | None:
    """None when vLLM can be imported, else why not (tests skip with this reason)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/driver error raised at import
        return f"vLLM is not importable here ({type(exc).__name__}: {exc}); install the gpu extra on a GPU machine"
    return None


def output_to_sample(output: Any, where: str = "vLLM engine") -> SampleOutput:
    """A ``vllm.CompletionOutput`` (``token_ids``, ``logprobs`` as ``[{id: Logprob}]``, ``finish_reason``)
    in Marco's terms. ``Logprob`` objects and plain floats are both accepted."""
    positions: list[Mapping[int, float]] = [
        {int(tid): float(getattr(lp, "logprob", lp)) for tid, lp in pos.items()} for pos in (output.logprobs or [])
    ]
    return from_logprob_dicts(list(output.token_ids), positions, normalise_finish(output.finish_reason), where)


class VLLMBackend(CodecBackend):
    """A :class:`~marco.llm.base.Backend` over ``vllm.LLMEngine``."""

    def __init__(self, engine: Any, codec: TextCodec, name: str, make_params: Callable[..., Any],
                 make_prompt: Callable[..., Any]) -> None:
        self.engine = engine
        self.codec = codec
        self.name = name
        self._params = make_params
        self._prompt = make_prompt
        self._counter = 0

    @classmethod
    def load(cls, model: str, name: str | None = None, max_batch_rows: int = 256, **engine_kwargs: Any) -> "VLLMBackend":
        reason = vllm_available()
        if reason is not None:
            raise RuntimeError(reason)
        from vllm import EngineArgs, LLMEngine, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        args = EngineArgs(
            model=model, enable_prefix_caching=True, logprobs_mode="raw_logprobs", max_num_seqs=max_batch_rows,
            **engine_kwargs,
        )
        engine = LLMEngine.from_engine_args(args)

        def make_params(**kwargs: Any) -> Any:
            return SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kwargs)

        return cls(engine, TextCodec(engine.get_tokenizer()), name or f"vllm:{model}", make_params,
                   lambda ids: TokensPrompt(prompt_token_ids=ids))

    # generation
    def generate_continuous(
        self,
        requests: Sequence[GenerationRequest],
        refill: Callable[[list[tuple[int, list[Generation]]]], Sequence[GenerationRequest]],
    ) -> None:
        """Run the engine's step loop; each request goes to ``refill`` as soon as its last sample finished and
        what ``refill`` returns is added to the running batch (ids continue from ``len(requests)``)."""
        assembler = RequestAssembler(self.codec.decode)
        jobs: dict[str, SampleJob] = {}
        next_id = 0

        def add(batch: Sequence[GenerationRequest]) -> None:
            nonlocal next_id
            for req in batch:
                for job in assembler.add_request(next_id, req):
                    self._counter += 1
                    key = f"marco-{self._counter}-{job.key}"
                    jobs[key] = job
                    self.engine.add_request(key, self._prompt(list(req.prompt_ids)), self._params(**vllm_sampling_kwargs(job)))
                next_id += 1

        add(requests)
        while jobs:
            completed: list[tuple[int, list[Generation]]] = []
            for ro in self.engine.step():
                if not ro.finished or ro.request_id not in jobs:
                    continue
                job = jobs.pop(ro.request_id)
                gens = assembler.done(job, output_to_sample(ro.outputs[0]))
                if gens is not None:
                    completed.append((job.rid, gens))
            if completed:
                add(list(refill(completed)))
