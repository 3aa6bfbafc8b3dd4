"""Attention through the caches must equal attention over the whole sequence with an explicit numpy mask."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxc.runtime.cache import KVCache, RotatingKVCache, make_caches

B, H, D = 2, 3, 8


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None) -> np.ndarray:
    """Full-sequence attention with a causal (+ sliding window) mask: query i sees keys j with i-window < j <= i."""
    s = q.shape[2]
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _cached(cache, q, k, v, chunks: list[int], window: int | None) -> np.ndarray:
    """Feed the sequence in `chunks`; build each chunk's mask from offset and the returned length only."""
    outs, pos = [], 0
    for t in chunks:
        offset = cache.offset
        assert offset == pos
        keys, values = cache.update_and_fetch(mx.array(k[:, :, pos : pos + t]), mx.array(v[:, :, pos : pos + t]))
        keys, values = np.array(keys), np.array(values)
        n = keys.shape[2]
        qpos = offset + np.arange(t)[:, None]
        kpos = offset + t - n + np.arange(n)[None, :]
        # The returned keys must be exactly history[kpos], contiguous and ending at the newest position.
        np.testing.assert_array_equal(keys, k[:, :, kpos[0]])
        np.testing.assert_array_equal(values, v[:, :, kpos[0]])
        allowed = kpos <= qpos
        if window is not None:
            allowed &= (qpos - kpos) < window
            assert n <= window - 1 + t
        scores = q[:, :, pos : pos + t] @ keys.transpose(0, 1, 3, 2) / np.sqrt(D)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        outs.append((p / p.sum(-1, keepdims=True)) @ values)
        pos += t
    return np.concatenate(outs, axis=2)


CASES = [
    # (window, chunks): prefill in chunks then token-by-token decode
    (None, [5, 1, 1, 1]),
    (None, [7, 3, 1, 1, 1, 1]),
    (None, [1] * 12),
    (4, [10, 1, 1, 1, 1]),  # prefill longer than the window
    (4, [2, 3, 1, 1, 1, 1, 1]),  # chunked prefill, window shorter than the sequence
    (4, [1] * 12),
    (1, [3, 1, 1]),  # each token sees only itself
    (6, [3, 8, 2, 1, 1, 1]),
    (64, [10, 1, 1]),  # window longer than the sequence
]


@pytest.mark.parametrize("window,chunks", CASES)
def test_cached_attention_matches_full(window: int | None, chunks: list[int]) -> None:
    rng = np.random.default_rng(0)
    s = sum(chunks)
    q, k, v = (rng.standard_normal((B, H, s, D)).astype(np.float32) for _ in range(3))
    # Small steps force buffer growth and compaction inside these short sequences.
    cache = KVCache(step=4) if window is None else RotatingKVCache(window, step=3)
    got = _cached(cache, q, k, v, chunks, window)
    np.testing.assert_allclose(got, _reference(q, k, v, window), rtol=1e-5, atol=1e-5)
    assert cache.offset == s


def test_long_decode_with_compaction_keeps_memory_bounded() -> None:
    rng = np.random.default_rng(1)
    window, s = 5, 300
    q, k, v = (rng.standard_normal((1, 1, s, D)).astype(np.float32) for _ in range(3))
    cache = RotatingKVCache(window, step=16)
    got = _cached(cache, q, k, v, [40] + [1] * (s - 40), window)
    np.testing.assert_allclose(got, _reference(q, k, v, window), rtol=1e-5, atol=1e-5)
    # Buffer is at most (window - 1) kept + new + 2 steps long, whatever the sequence length.
    assert cache.keys.shape[2] <= window - 1 + 1 + 2 * 16
    keys, _ = cache.state
    np.testing.assert_array_equal(np.array(keys), k[:, :, s - (window - 1) :])


def test_make_caches_and_reporting() -> None:
    caches = make_caches([None, 8, None])
    assert [type(c) for c in caches] == [KVCache, RotatingKVCache, KVCache]
    assert caches[1].window == 8
    assert all(c.offset == 0 and c.nbytes == 0 and c.state is None for c in caches)
    x = mx.zeros((1, 2, 3, 4), dtype=mx.float16)
    caches[0].update_and_fetch(x, x)
    assert caches[0].nbytes >= 2 * 3 * 2 * 4 * 2
    assert caches[0].state[0].shape == (1, 2, 3, 4)


def test_trim() -> None:
    rng = np.random.default_rng(2)
    k = rng.standard_normal((1, 1, 10, D)).astype(np.float32)
    full = KVCache(step=4)
    full.update_and_fetch(mx.array(k[:, :, :8]), mx.array(k[:, :, :8]))
    assert full.trim(3) == 3 and full.offset == 5
    keys, _ = full.update_and_fetch(mx.array(k[:, :, 8:10]), mx.array(k[:, :, 8:10]))
    np.testing.assert_array_equal(np.array(keys), np.concatenate([k[:, :, :5], k[:, :, 8:10]], axis=2))

    rot = RotatingKVCache(3, step=2)
    for t in range(6):
        rot.update_and_fetch(mx.array(k[:, :, t : t + 1]), mx.array(k[:, :, t : t + 1]))
    assert rot.trim(1) == 1 and rot.offset == 5  # undoing one decode step is always exact
    keys, _ = rot.update_and_fetch(mx.array(k[:, :, 9:10]), mx.array(k[:, :, 9:10]))
    np.testing.assert_array_equal(np.array(keys), np.concatenate([k[:, :, 3:5], k[:, :, 9:10]], axis=2))
    assert not rot.can_trim(4)
    with pytest.raises(ValueError, match="cannot trim"):  # the generated module's classes know no mlxc errors
        rot.trim(4)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="sliding window"):
        RotatingKVCache(0)
    with pytest.raises(ValueError, match="kv_heads"):
        KVCache().update_and_fetch(mx.zeros((2, 3, 4)), mx.zeros((2, 3, 4)))
