"""Automatic prefix caching for the transformers backend.

A search re-sends long prefixes every round: the system prompt, the question and every step so far. The
keys and values of a prefix do not depend on what follows it, so the backend keeps the KV tensors of the
sequences it has processed and, for a new request, prefills only the part after the longest cached
prefix (the idea of vLLM's automatic prefix caching, at block granularity, with LRU eviction by bytes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

BLOCK = 16


@dataclass
class Entry:
    eid: int
    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [kv_heads, len, head_dim]
    values: list[torch.Tensor]
    nbytes: int


def block_hashes(ids: Sequence[int], block: int = BLOCK) -> list[int]:
    """Rolling hashes of ``ids[:block]``, ``ids[:2*block]``, …"""
    out: list[int] = []
    h = 0
    for j in range(len(ids) // block):
        h = hash((h, tuple(ids[j * block : (j + 1) * block])))
        out.append(h)
    return out


class PrefixKVCache:
    """KV tensors of processed sequences, looked up by longest block-aligned common prefix."""

    def __init__(self, max_bytes: int = 2 << 30, block: int = BLOCK) -> None:
        self.max_bytes = max_bytes
        self.block = block
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.index: dict[int, tuple[int, int]] = {}  # block hash -> (entry id, prefix length)
        self.bytes = 0
        self.next_id = 0
        self.hits_tokens = 0
        self.lookups_tokens = 0

    def lookup(self, ids: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest block-aligned prefix with ``ids`` and that prefix's length.

        At least one token of ``ids`` is always left uncached, since the model must run on it to give the
        next token's logits.
        """
        best: tuple[Entry | None, int] = (None, 0)
        limit = len(ids) - 1
        for h in block_hashes(ids[:limit], self.block):
            hit = self.index.get(h)
            if hit is None:
                break
            entry = self.entries.get(hit[0])
            if entry is None:
                break
            best = (entry, hit[1])
        entry, m = best
        if entry is not None and tuple(ids[:m]) != entry.ids[:m]:  # hash collision guard
            return None, 0
        if entry is not None:
            self.entries.move_to_end(entry.eid)
        self.lookups_tokens += len(ids)
        self.hits_tokens += m
        return best

    def insert(self, ids: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the KV of ``ids`` (``keys[l]`` is ``[kv_heads, len(ids), head_dim]``)."""
        if len(ids) < self.block:
            return
        hashes = block_hashes(ids, self.block)
        if hashes and hashes[-1] in self.index and self.index[hashes[-1]][1] == len(hashes) * self.block:
            # an entry already covers every full block of this sequence
            old = self.index[hashes[-1]][0]
            if old in self.entries and len(self.entries[old].ids) >= len(ids):
                self.entries.move_to_end(old)
                return
        nbytes = sum(k.numel() * k.element_size() for k in keys) * 2
        if nbytes > self.max_bytes:
            return
        eid = self.next_id
        self.next_id += 1
        self.entries[eid] = Entry(eid, tuple(ids), keys, values, nbytes)
        self.bytes += nbytes
        for j, h in enumerate(hashes):
            self.index[h] = (eid, (j + 1) * self.block)
        while self.bytes > self.max_bytes and self.entries:
            self._evict()

    def _evict(self) -> None:
        eid, entry = self.entries.popitem(last=False)
        self.bytes -= entry.nbytes
        for j, h in enumerate(block_hashes(entry.ids, self.block)):
            if self.index.get(h, (None,))[0] == eid:
                del self.index[h]

    def clear(self) -> None:
        self.entries.clear()
        self.index.clear()
        self.bytes = 0

    @property
    def hit_rate(self) -> float:
        return self.hits_tokens / self.lookups_tokens if self.lookups_tokens else 0.0


def growing_layer_class() -> type:
    """A transformers ``DynamicLayer`` that appends into preallocated buffers (capacity doubles) rather
    than concatenating the whole cache at every decode step, which is O(length) copying per token."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _kbuf: torch.Tensor | None = None
        _vbuf: torch.Tensor | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states, value_states
                self._kbuf = self._vbuf = None
                return self.keys, self.values
            n, add = self.keys.shape[-2], key_states.shape[-2]
            buf = self._kbuf
            # reallocate when full, or when someone replaced the tensors (row selection, merges)
            if buf is None or n + add > buf.shape[-2] or self.keys.data_ptr() != buf.data_ptr() or buf.shape[0] != self.keys.shape[0]:
                cap = max(64, 2 * (n + add))
                shape = (*self.keys.shape[:-2], cap, self.keys.shape[-1])
                self._kbuf = self.keys.new_empty(shape)
                self._vbuf = self.values.new_empty(shape)
                self._kbuf[..., :n, :] = self.keys
                self._vbuf[..., :n, :] = self.values
            assert self._kbuf is not None and self._vbuf is not None
            self._kbuf[..., n : n + add, :] = key_states
            self._vbuf[..., n : n + add, :] = value_states
            self.keys = self._kbuf[..., : n + add, :]
            self.values = self._vbuf[..., : n + add, :]
            return self.keys, self.values

    return GrowingLayer


_GROWING: type | None = None


def growing_cache(config: object):  # type: ignore[no-untyped-def]
    """A ``DynamicCache`` whose layers grow in place (see :func:`growing_layer_class`)."""
    global _GROWING
    from transformers import DynamicCache

    if _GROWING is None:
        _GROWING = growing_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [_GROWING() for _ in cache.layers]
    return cache
