"""A model-agnostic generation loop: prefill once, then decode one token per step.

The model is just `step(ids [B, t], cache) -> logits [B, t, vocab]`, so the same loop drives any compiled model.
Like mlx-lm, step n+1 is queued with `mx.async_eval` before token n is handed to the caller, so the host-side work
(detokenizing, printing, the stop check) overlaps the next forward pass.

Cache contract: when the stream ends (max tokens, all sequences stopped, or the consumer stops iterating), the cache
holds the prompt plus every yielded token except the last one, i.e. the last yielded token is the one to feed next.
The speculative extra step is undone with `cache.trim(1)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlxc.ir.errors import MlxcError
from mlxc.runtime.sampling import Sampler, SamplingParams

StepFn = Callable[[mx.array, list], mx.array]


def _as_prompt(prompt: mx.array | Sequence[int] | Sequence[Sequence[int]]) -> mx.array:
    """The prompt as int32 `[B, T]`; a 1-D prompt is one sequence."""
    if isinstance(prompt, mx.array):
        p = prompt
    else:
        try:
            a = np.asarray(prompt)
        except ValueError as e:
            raise MlxcError(f"prompt must be a rectangular array of token ids ({e})") from None
        if a.size and a.dtype.kind not in "iu":
            raise MlxcError(f"prompt token ids must be integers, got {a.dtype} values")
        p = mx.array(a.astype(np.int64))
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2:
        raise MlxcError(f"prompt must have shape [batch, tokens], got {p.shape}")
    if p.size == 0:
        raise MlxcError(f"prompt is empty (shape {p.shape}); give at least one token per sequence")
    if mx.issubdtype(p.dtype, mx.floating) or p.dtype == mx.bool_:
        raise MlxcError(f"prompt token ids must be integers, got dtype {p.dtype}")
    return p.astype(mx.int32)


def _check_ids(ids: mx.array, vocab_size: int) -> None:
    lo, hi = mx.min(ids).item(), mx.max(ids).item()
    if lo < 0:
        raise MlxcError(f"token id {lo} out of range for vocabulary of {vocab_size}")
    if hi >= vocab_size:
        raise MlxcError(f"token id {hi} out of range for vocabulary of {vocab_size}")


def _last_logits(step: StepFn, ids: mx.array, cache: list) -> mx.array:
    logits = step(ids, cache)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise MlxcError(f"step returned logits of shape {logits.shape} for input ids of shape {ids.shape}; "
                        "expected [batch, tokens, vocab]")
    return logits[:, -1, :]


def generate_stream(
    step: StepFn,
    prompt: mx.array | Sequence[int] | Sequence[Sequence[int]],
    cache: list,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
) -> Iterator[mx.array]:
    """Yield the next token ids `[B]` (int32, evaluated) for each of up to `max_new_tokens` steps.

    Stops early once every sequence has produced one of `params.stop_tokens`; a sequence that stopped keeps emitting
    `pad_token_id`, or its own stop token when that is None, so the batch stays rectangular. `vocab_size` bounds
    the prompt ids (defaults to the logits' last dimension, checked after prefill, before anything is yielded).
    """
    params = params or SamplingParams()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise MlxcError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    ids = _as_prompt(prompt)
    if vocab_size is not None:
        if vocab_size < 1:
            raise MlxcError(f"vocab_size must be positive, got {vocab_size}")
        _check_ids(ids, vocab_size)
    if max_new_tokens == 0:
        return

    sampler = Sampler(params)
    batch = ids.shape[0]
    penalize = params.repetition_penalty != 1.0
    history = ids if penalize else None
    stops = mx.array(list(params.stop_tokens), dtype=mx.int32) if params.stop_tokens else None
    done = mx.zeros((batch,), dtype=mx.bool_)
    fill = mx.zeros((batch,), dtype=mx.int32)  # what a finished sequence emits

    def pick(logits: mx.array) -> tuple[mx.array, mx.array]:
        """Sample, then mask finished rows; returns the tokens and the finished-mask after them."""
        nonlocal history, done, fill
        y = sampler(logits, history)
        if stops is not None:
            y = mx.where(done, fill, y)
            hit = mx.logical_and(mx.any(y[:, None] == stops[None, :], axis=1), mx.logical_not(done))
            fill = mx.where(hit, y if pad_token_id is None else mx.full((batch,), pad_token_id, mx.int32), fill)
            done = mx.logical_or(done, hit)
        if penalize:
            history = mx.concatenate([history, y[:, None]], axis=1)
        return y, done

    logits = _last_logits(step, ids, cache)
    if vocab_size is None:
        _check_ids(ids, logits.shape[-1])
    y, y_done = pick(logits)
    mx.async_eval(y, y_done)
    pending = False  # whether the cache already holds `y` (next step queued)
    try:
        for n in range(max_new_tokens):
            if n + 1 < max_new_tokens:
                next_y, next_done = pick(_last_logits(step, y[:, None], cache))
                mx.async_eval(next_y, next_done)
                pending = True
            mx.eval(y)
            stop_now = stops is not None and bool(mx.all(y_done).item())
            yield y
            if stop_now:
                break
            if pending:
                y, y_done, pending = next_y, next_done, False
    finally:
        if pending:
            for c in cache:
                if hasattr(c, "trim"):
                    c.trim(1)


def generate(
    step: StepFn,
    prompt: mx.array | Sequence[int] | Sequence[Sequence[int]],
    cache: list,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
) -> mx.array:
    """The prompt followed by the generated tokens, `[B, T + n]` with n <= max_new_tokens (fewer on early stop)."""
    ids = _as_prompt(prompt)
    out = list(
        generate_stream(step, ids, cache, max_new_tokens, params, vocab_size=vocab_size, pad_token_id=pad_token_id)
    )
    if not out:
        return ids
    return mx.concatenate([ids, mx.stack(out, axis=1)], axis=1)
