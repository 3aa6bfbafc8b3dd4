"""Key/value caches that generated model code reads and extends during generation.

Protocol (what the emitted attention code relies on): before attending, a layer reads `cache.offset` (the absolute
position of its first new token), then calls `k, v = cache.update_and_fetch(k, v)` with `[B, kv_heads, T, head_dim]`
arrays. The returned keys/values are always in temporal order and end at the newest position, so the layer can
build its causal (and sliding-window) mask from `offset`, `T` and the returned length alone.

Both caches keep a preallocated buffer and slice-assign into it, because concatenating on every decode step would copy
the whole history once per token.
"""

from __future__ import annotations

import mlx.core as mx

from mlxc.ir.errors import MlxcError

_STEP = 256


def _alloc(like: mx.array, length: int) -> mx.array:
    """A zero buffer shaped like `like` but `length` long on the time axis."""
    b, h, _, d = like.shape
    return mx.zeros((b, h, length, d), dtype=like.dtype)


def _round_up(n: int, step: int) -> int:
    return ((n + step - 1) // step) * step


def _check_kv(keys: mx.array, values: mx.array) -> int:
    """Validate one update and return its length T; a wrong shape here means a codegen bug, so say which."""
    if keys.ndim != 4 or values.ndim != 4:
        raise MlxcError(
            f"KV cache expects [B, kv_heads, T, head_dim] keys and values, got shapes {keys.shape} and {values.shape}"
        )
    if keys.shape[:3] != values.shape[:3]:
        raise MlxcError(f"KV cache keys {keys.shape} and values {values.shape} disagree on [B, kv_heads, T]")
    return keys.shape[2]


class KVCache:
    """Unbounded cache for full (global) attention; grows its buffer `step` positions at a time."""

    def __init__(self, step: int = _STEP) -> None:
        if step < 1:
            raise MlxcError(f"KV cache step must be positive, got {step}")
        self.step = step
        self.offset = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append T new positions; return all cached keys/values `[:, :, :offset]` in temporal order."""
        t = _check_kv(keys, values)
        prev = self.offset
        if self.keys is None or prev + t > self.keys.shape[2]:
            grow = _round_up(t, self.step)
            new_k, new_v = _alloc(keys, grow), _alloc(values, grow)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                # Drop any slack past `prev` first so the buffer stays exactly what is used plus one step.
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev : prev + t, :] = keys
        self.values[..., prev : prev + t, :] = values
        self.offset = prev + t
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        """The cached keys/values (no slack), or None before the first update."""
        if self.keys is None:
            return None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers, slack included, for memory reporting."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def trim(self, n: int) -> int:
        """Forget the newest `n` positions (for speculative decoding / undoing a step); returns how many went."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def reset(self) -> None:
        """Forget every position (the buffers stay for reuse)."""
        self.offset = 0

    def __repr__(self) -> str:
        return f"KVCache(offset={self.offset}, nbytes={self.nbytes})"


class RotatingKVCache:
    """Bounded cache for sliding-window attention where a query sees the last `window` positions, itself included.

    It keeps at most `window - 1` past positions. An update with T new tokens returns the kept past followed by the
    T new keys, so even a prefill longer than the window gets every key some query in it needs, in temporal order.
    The buffer is compacted (kept past moved to the front) only when it runs out of room, once per `step` decode
    tokens, rather than rotated in place: that keeps the returned keys contiguous in time, which the mask relies on.
    """

    def __init__(self, window: int, step: int = _STEP) -> None:
        if not isinstance(window, int) or window < 1:
            raise MlxcError(f"sliding window must be a positive integer, got {window!r}")
        if step < 1:
            raise MlxcError(f"KV cache step must be positive, got {step}")
        self.window = window
        self.step = step
        self.offset = 0  # every position ever seen
        self._idx = 0  # write position in the buffer; buffer[:, :, :_idx] is a temporal-order suffix of history
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def _keep(self) -> int:
        return self.window - 1

    def _compact(self, t: int) -> None:
        """Move the kept past to the front of a fresh buffer with room for `t` new positions plus one step."""
        start = max(0, self._idx - self._keep)
        size = (self._idx - start) + t + self.step
        new_k = _alloc(self.keys, size)
        new_v = _alloc(self.values, size)
        if self._idx > start:
            new_k[..., : self._idx - start, :] = self.keys[..., start : self._idx, :]
            new_v[..., : self._idx - start, :] = self.values[..., start : self._idx, :]
        self.keys, self.values = new_k, new_v
        self._idx -= start

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append T new positions; return (up to window-1 kept past positions) + the T new ones, in time order."""
        t = _check_kv(keys, values)
        if self.keys is None:
            self.keys = _alloc(keys, t + self.step)
            self.values = _alloc(values, t + self.step)
        else:
            kept = min(self._idx, self._keep)
            capacity = self.keys.shape[2]
            # Compact when full, and also when a long prefill left a buffer far bigger than needed.
            if self._idx + t > capacity or capacity > kept + t + 2 * self.step:
                self._compact(t)
        i = self._idx
        self.keys[..., i : i + t, :] = keys
        self.values[..., i : i + t, :] = values
        self._idx = i + t
        self.offset += t
        start = max(0, i - self._keep)
        return self.keys[..., start : self._idx, :], self.values[..., start : self._idx, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        """The last min(offset, window - 1) positions, which is all the next update needs, or None if empty."""
        if self.keys is None:
            return None
        start = max(0, self._idx - self._keep)
        return self.keys[..., start : self._idx, :], self.values[..., start : self._idx, :]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers, slack included, for memory reporting."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def trim(self, n: int) -> int:
        """Forget the newest `n` positions; only possible while the buffer still holds the history that exposes.

        After trimming, the next query must still see min(window - 1, offset) past positions; if the buffer has
        already dropped some of them, trimming would silently shrink the window, so it raises instead.
        """
        n = max(0, min(self.offset, n))
        if self._idx - n < min(self._keep, self.offset - n):
            raise MlxcError(
                f"cannot trim {n} positions from a sliding-window cache (window {self.window}): "
                f"it only holds the last {self._idx} positions"
            )
        self._idx -= n
        self.offset -= n
        return n

    def reset(self) -> None:
        """Forget every position (the buffers stay for reuse)."""
        self.offset = self._idx = 0

    def __repr__(self) -> str:
        return f"RotatingKVCache(window={self.window}, offset={self.offset}, nbytes={self.nbytes})"


def check_max_kv_size(n) -> int | None:
    """None (unbounded) or a positive number of positions a query may see, itself included."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MlxcError(f"max_kv_size must be a positive integer (positions kept in the KV cache), got {n!r}")
    return n


def make_caches(windows: list[int | None], step: int = _STEP,
                max_kv_size: int | None = None) -> list[KVCache | RotatingKVCache]:
    """One cache per layer: `None` means full attention (KVCache), an int the layer's sliding window.

    `max_kv_size` bounds every layer to that many positions (mlx-lm's `--max-kv-size`): full-attention layers get a
    rotating cache of that size and sliding-window layers keep the smaller of the two. The generated attention reads
    the bound from the cache, so a query never sees more than that many positions, in prefill as in decode.
    """
    limit = check_max_kv_size(max_kv_size)
    if limit is not None:
        windows = [limit if w is None else min(w, limit) for w in windows]
    return [KVCache(step) if w is None else RotatingKVCache(w, step) for w in windows]
