"""Token sampling with the same semantics as transformers' logits processors.

Order (transformers' `generate` order): repetition penalty -> temperature -> top-k -> top-p -> min-p. Greedy
(temperature 0) takes the argmax after the repetition penalty; the warpers never drop the maximum, so they are
skipped there. Everything stays lazy in MLX so the generation loop can overlap sampling with the next forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxc.ir.errors import MlxcError

History = Sequence[Sequence[int]] | mx.array | None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults mean greedy decoding with no filtering."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def bad(msg: str) -> MlxcError:
            return MlxcError(f"invalid sampling parameters: {msg}")

        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not (0.0 <= self.min_p <= 1.0):
            raise bad(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p!r}")
        rp = self.repetition_penalty
        if not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0:
            raise bad(f"repetition_penalty must be a finite number > 0 (1 turns it off), got {rp!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise bad(f"seed must be None or an integer >= 0, got {self.seed!r}")
        stops = (self.stop_tokens,) if isinstance(self.stop_tokens, int) else tuple(self.stop_tokens)
        for t in stops:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
                raise bad(f"stop_tokens must be non-negative token ids, got {t!r}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stops))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _history_array(history: History, batch: int, vocab: int) -> mx.array | None:
    """History as an int32 `[B, n]` array; ragged lists are padded with `vocab`, an id the penalty ignores."""
    if history is None:
        return None
    if isinstance(history, mx.array):
        h = history if history.ndim == 2 else history.reshape(batch, -1)
    else:
        rows = [list(r) for r in history]
        if len(rows) != batch:
            raise MlxcError(f"history has {len(rows)} rows but the logits have batch size {batch}")
        n = max((len(r) for r in rows), default=0)
        h = mx.array(np.array([r + [vocab] * (n - len(r)) for r in rows], dtype=np.int32).reshape(batch, n))
    if h.shape[0] != batch:
        raise MlxcError(f"history has {h.shape[0]} rows but the logits have batch size {batch}")
    return h


def apply_repetition_penalty(logits: mx.array, history: History, penalty: float) -> mx.array:
    """transformers' RepetitionPenaltyLogitsProcessor: each token seen in the history (prompt included) gets its logit
    divided by `penalty` when positive and multiplied when negative, once however often it occurred."""
    h = _history_array(history, logits.shape[0], logits.shape[-1])
    if penalty == 1.0 or h is None or h.shape[1] == 0:
        return logits
    vocab = logits.shape[-1]
    # Ids outside the vocabulary (and the ragged padding) go to one spare column that is dropped afterwards.
    h = mx.clip(h.astype(mx.int32), 0, vocab)
    padded = mx.concatenate([logits, mx.zeros((logits.shape[0], 1), dtype=logits.dtype)], axis=-1)
    seen = mx.take_along_axis(padded, h, axis=-1)
    seen = mx.where(seen < 0, seen * penalty, seen / penalty)
    return mx.put_along_axis(padded, h, seen, axis=-1)[:, :vocab]


def _top_k(logits: mx.array, k: int) -> mx.array:
    """TopKLogitsWarper: drop every logit strictly below the k-th largest (ties with it survive)."""
    k = min(k, logits.shape[-1])
    kth = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logits < kth, -mx.inf, logits)


def _top_p(logits: mx.array, p: float) -> mx.array:
    """TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is <= 1 - p, never the top one."""
    order = mx.argsort(logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    cum = mx.cumsum(mx.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= (1.0 - p)
    keep_last = mx.arange(logits.shape[-1]) == logits.shape[-1] - 1
    remove_sorted = mx.logical_and(remove_sorted, mx.logical_not(keep_last))
    remove = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, remove_sorted, axis=-1)
    return mx.where(remove, -mx.inf, logits)


def _min_p(logits: mx.array, min_p: float) -> mx.array:
    """MinPLogitsWarper: drop tokens less likely than `min_p` times the most likely one (which always survives)."""
    probs = mx.softmax(logits, axis=-1)
    return mx.where(probs < min_p * mx.max(probs, axis=-1, keepdims=True), -mx.inf, logits)


def filter_logits(logits: mx.array, params: SamplingParams, history: History = None) -> mx.array:
    """The logits the sampler draws from: penalised, temperature-scaled, filtered tokens set to -inf.

    `logits` is `[B, vocab]`; the result is float32. For greedy params only the repetition penalty applies.
    """
    if logits.ndim != 2:
        raise MlxcError(f"expected logits of shape [batch, vocab], got {logits.shape}")
    x = logits.astype(mx.float32)
    x = apply_repetition_penalty(x, history, params.repetition_penalty)
    if params.greedy:
        return x
    if params.temperature != 1.0:
        x = x / params.temperature
    if params.top_k > 0:
        x = _top_k(x, params.top_k)
    if params.top_p < 1.0:
        x = _top_p(x, params.top_p)
    if params.min_p > 0.0:
        x = _min_p(x, params.min_p)
    return x


class Sampler:
    """Picks next tokens from `[B, vocab]` logits. With a seed, the sequence of draws is reproducible: the sampler
    owns an explicit PRNG key and splits it once per call, never touching MLX's global random state."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self._key = None if self.params.seed is None else mx.random.key(self.params.seed)

    def __call__(self, logits: mx.array, history: History = None) -> mx.array:
        """Next token ids `[B]` (int32), lazily evaluated."""
        x = filter_logits(logits, self.params, history)
        if self.params.greedy:
            return mx.argmax(x, axis=-1).astype(mx.int32)
        key = None
        if self._key is not None:
            self._key, key = mx.random.split(self._key)
        return mx.random.categorical(x, axis=-1, key=key).astype(mx.int32)
