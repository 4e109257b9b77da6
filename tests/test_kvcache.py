import torch

from marco.llm.kvcache import PrefixKVCache


def kv(n: int, fill: float = 1.0):
    return [torch.full((2, n, 4), fill)], [torch.full((2, n, 4), -fill)]


def test_longest_block_aligned_prefix_leaving_one_token():
    cache = PrefixKVCache(block=4)
    cache.insert(list(range(10)), *kv(10))
    entry, m = cache.lookup(list(range(10)) + [99])
    assert entry is not None and m == 8  # blocks of 4: 8 tokens; never the whole prompt
    entry, m = cache.lookup(list(range(8)))
    assert m == 4  # at least one token must stay uncached
    entry, m = cache.lookup([0, 1, 2, 7, 8])
    assert entry is None and m == 0
    assert 0 < cache.hit_rate < 1


def test_lru_eviction_by_bytes():
    one = sum(t.numel() * t.element_size() for t in kv(8)[0]) * 2
    cache = PrefixKVCache(max_bytes=2 * one, block=4)
    cache.insert([1] * 8, *kv(8))
    cache.insert([2] * 8, *kv(8))
    assert cache.lookup([1] * 9)[1] == 8  # touch the first: the second is now least recent
    cache.insert([3] * 8, *kv(8))
    assert cache.bytes <= 2 * one
    assert cache.lookup([2] * 9)[0] is None
    assert cache.lookup([1] * 9)[1] == 8 and cache.lookup([3] * 9)[1] == 8
