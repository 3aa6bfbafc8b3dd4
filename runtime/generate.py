"""A model-agnostic generation loop: prefill once, then decode one token per step.

The model is just `step(ids [B, t], cache) -> logits [B, t, vocab]` (or [B, 1, vocab], the last position's), so
the same loop drives any compiled model.
Like mlx-lm, step n+1 is queued with `mx.async_eval` before token n (n > 0) is handed to the caller, so the
host-side work (detokenizing, printing, the stop check) overlaps the next forward pass; token 0 goes out first.

Cache contract: when the stream ends (max tokens, all sequences stopped, or the consumer stops iterating), the cache
holds the prompt plus every yielded token except the last one, i.e. the last yielded token is the one to feed next.
The speculative extra step is taken back the way each state allows (`ModelCache.rewind`): KV caches forget it,
recurrent states return to the snapshot taken just before it — never trimmed silently.

LongRoPE (Phi-3): keys cached while the sequence was within the original context were rotated with the short
factors; like transformers' Phi-3 generation, the step that takes the sequence past that context runs the whole
sequence again on an emptied cache (`recompute_at`), so every position from then on uses the long factors.

Log-probabilities (`logprobs=N`) follow mlx-lm's convention: the log-softmax of the model's raw logits, before the
repetition penalty, temperature or any filter, so they describe the model, not the sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxc.ir.attrs import RopeKind
from mlxc.ir.errors import MlxcError
from mlxc.runtime.sampling import Sampler, SamplingParams

StepFn = Callable[[mx.array, list], mx.array]


@dataclass(frozen=True)
class TokenLogprobs:
    """One generation step with log-probabilities, for a batch of B sequences (arrays are evaluated).

    `logprobs[b]` is the log-probability of `tokens[b]` under the model (NaN for a row that had already stopped and
    only repeats its fill token); `top_tokens[b]` are the N most likely ids, most likely first, with their
    log-probabilities in `top_logprobs[b]`.
    """

    tokens: mx.array  # [B] int32
    logprobs: mx.array  # [B] float32
    top_tokens: mx.array  # [B, N] int32
    top_logprobs: mx.array  # [B, N] float32


@dataclass(frozen=True)
class TextToken:
    """One sampled token of a text stream with `logprobs=N`: `text` is what it added to the shown output (possibly
    '' while held back), `logprob` its log-probability under the model, `top` the N most likely (id, logprob)."""

    text: str
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationStats:
    """Timing of one generation, filled in as it runs (pass one as `stats=`): what mlx-lm reports after generating.

    The prompt time runs from the start to the first new token (prefill plus one sample); the generation rate counts
    the tokens after the first over the time since it, so neither rate includes the other phase.
    """

    prompt_tokens: int = 0  # all rows
    prompt_seconds: float = 0.0
    generation_tokens: int = 0  # steps x batch, the first token and any stop token included
    generation_seconds: float = 0.0  # from the first new token to the last
    batch: int = 1

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float | None:
        """Tokens per second after the first one; None when fewer than two steps ran (nothing to time)."""
        later = self.generation_tokens - self.batch
        return later / self.generation_seconds if later > 0 and self.generation_seconds > 0 else None


def check_logprobs(n, vocab_size: int | None = None) -> int | None:
    """`logprobs` is None (off) or how many alternatives to report per step (0: only the chosen token's)."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise MlxcError(f"logprobs must be None or an integer >= 0 (how many top alternatives), got {n!r}")
    if vocab_size is not None and n > vocab_size:
        raise MlxcError(f"logprobs={n} asks for more alternatives than the vocabulary has ({vocab_size})")
    return int(n)


def check_stop_tokens(stops: Sequence[int], vocab_size: int) -> None:
    """A stop id the model can never produce is a mistake (a typo, another model's id): say so."""
    for t in stops:
        if not 0 <= t < vocab_size:
            raise MlxcError(f"stop token {t} is outside the vocabulary of {vocab_size} ids (0..{vocab_size - 1})")


def _log_softmax_top(logits: mx.array, y: mx.array, n: int) -> tuple[mx.array, mx.array, mx.array]:
    """Log-probability of the chosen ids `y` under `logits`, and the top-n ids and log-probabilities (sorted)."""
    x = logits.astype(mx.float32)
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, y[:, None], axis=-1)[:, 0]
    if n == 0:
        batch = lp.shape[0]
        return chosen, mx.zeros((batch, 0), mx.int32), mx.zeros((batch, 0), mx.float32)
    idx = mx.argpartition(-lp, kth=n - 1, axis=-1)[:, :n]
    vals = mx.take_along_axis(lp, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return chosen, mx.take_along_axis(idx, order, axis=-1).astype(mx.int32), mx.take_along_axis(vals, order, axis=-1)


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
    if logits.ndim != 3 or logits.shape[0] != ids.shape[0] or logits.shape[1] not in (1, ids.shape[1]):
        raise MlxcError(f"step returned logits of shape {logits.shape} for input ids of shape {ids.shape}; "
                        "expected [batch, tokens, vocab] (or [batch, 1, vocab]: the last position's)")
    return logits[:, -1, :]


def longrope_context(program) -> int | None:
    """The original context of the program's LongRoPE rotary embeddings (the `recompute_at` its generation needs);
    None when it has none."""
    found = {o.attrs["scaling"].original_max_position_embeddings for fn in program.functions for o in fn.ops
             if o.op == "rope" and o.attrs["scaling"].kind == RopeKind.LONGROPE}
    return min(found) if found else None


class _Stepper:
    """Feeds the model, restarting the cache when a call crosses `recompute_at` (see the module docstring); it keeps
    the ids the cache holds for that, starting from `context`."""

    def __init__(self, step: StepFn, cache: list, recompute_at: int | None, context) -> None:
        self.step, self.cache, self.recompute_at = step, cache, recompute_at
        self.held = int(getattr(cache, "offset", 0))  # positions the cache holds
        self.seen: list[mx.array] = [] if context is None else [_as_prompt(context)] if len(context) else []

    def __call__(self, ids: mx.array) -> mx.array:
        if self.recompute_at is None or self.held > self.recompute_at:  # nothing (more) to restart
            return _last_logits(self.step, ids, self.cache)
        if 0 < self.held <= self.recompute_at < self.held + ids.shape[1]:
            known = sum(s.shape[1] for s in self.seen)
            if known != self.held:
                raise MlxcError(f"the sequence grows past the model's original context ({self.recompute_at} "
                                f"positions), where its LongRoPE cache has to be recomputed from the token ids, but "
                                f"the cache holds {self.held} positions and only {known} ids were given (context=)")
            self.cache.reset()
            ids = mx.concatenate(self.seen + [ids], axis=1)
            self.seen, self.held = [], 0
        self.seen.append(ids)
        self.held += ids.shape[1]
        return _last_logits(self.step, ids, self.cache)


def generate_stream(
    step: StepFn,
    prompt: mx.array | Sequence[int] | Sequence[Sequence[int]],
    cache: list,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    logprobs: int | None = None,
    stats: GenerationStats | None = None,
    recompute_at: int | None = None,
    context: mx.array | Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> Iterator[mx.array] | Iterator[TokenLogprobs]:
    """Yield the next token ids `[B]` (int32, evaluated) for each of up to `max_new_tokens` steps, or with
    `logprobs=N` a `TokenLogprobs` per step (the ids plus their log-probabilities and the top N alternatives).

    Stops early once every sequence has produced one of `params.stop_tokens`; a sequence that stopped keeps emitting
    `pad_token_id`, or its own stop token when that is None, so the batch stays rectangular. `vocab_size` bounds
    the prompt and stop ids (defaults to the logits' last dimension, checked after prefill, before anything is
    yielded). `stats`, when given, is filled in with the prompt and generation timings as the stream runs.
    `recompute_at` restarts the cache where a LongRoPE model's sequence outgrows its original context (see the module
    docstring); `context` are the ids a non-empty cache already holds, which that restart runs again.
    """
    start = time.perf_counter()
    params = params or SamplingParams()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise MlxcError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    ids = _as_prompt(prompt)
    top_n = check_logprobs(logprobs, vocab_size)
    if vocab_size is not None:
        if vocab_size < 1:
            raise MlxcError(f"vocab_size must be positive, got {vocab_size}")
        _check_ids(ids, vocab_size)
        check_stop_tokens(params.stop_tokens, vocab_size)
    if stats is not None:
        stats.prompt_tokens, stats.batch = ids.size, ids.shape[0]
        stats.prompt_seconds = stats.generation_seconds = 0.0
        stats.generation_tokens = 0
    if max_new_tokens == 0:
        return

    sampler = Sampler(params)
    batch = ids.shape[0]
    penalize = params.repetition_penalty != 1.0
    history = ids if penalize else None
    stops = mx.array(list(params.stop_tokens), dtype=mx.int32) if params.stop_tokens else None
    done = mx.zeros((batch,), dtype=mx.bool_)
    fill = mx.zeros((batch,), dtype=mx.int32)  # what a finished sequence emits

    def pick(logits: mx.array) -> tuple[mx.array | TokenLogprobs, mx.array]:
        """Sample, then mask finished rows; returns the tokens (with their log-probabilities when asked) and the
        finished-mask after them."""
        nonlocal history, done, fill
        y = sampler(logits, history)
        was_done = done
        if stops is not None:
            y = mx.where(done, fill, y)
            hit = mx.logical_and(mx.any(y[:, None] == stops[None, :], axis=1), mx.logical_not(done))
            fill = mx.where(hit, y if pad_token_id is None else mx.full((batch,), pad_token_id, mx.int32), fill)
            done = mx.logical_or(done, hit)
        if penalize:
            history = mx.concatenate([history, y[:, None]], axis=1)
        if top_n is None:
            return y, done
        chosen, top_ids, top_lp = _log_softmax_top(logits, y, top_n)
        chosen = mx.where(was_done, mx.array(float("nan"), mx.float32), chosen)
        return TokenLogprobs(y, chosen, top_ids, top_lp), done

    def arrays(out) -> list[mx.array]:
        if isinstance(out, TokenLogprobs):
            return [out.tokens, out.logprobs, out.top_tokens, out.top_logprobs]
        return [out]

    run = _Stepper(step, cache, recompute_at, context)
    logits = run(ids)
    if vocab_size is None:
        _check_ids(ids, logits.shape[-1])
        check_stop_tokens(params.stop_tokens, logits.shape[-1])
        check_logprobs(top_n, logits.shape[-1])
    y, y_done = pick(logits)
    mx.eval(*arrays(y), y_done)
    first = time.perf_counter()  # when the first new token was ready
    if stats is not None:
        stats.prompt_seconds = first - start
    pending = False  # whether the cache already holds `y` (next step queued)

    def queue_next():
        nonlocal next_y, next_done, before, pending
        tokens = y.tokens if isinstance(y, TokenLogprobs) else y
        before = _snapshot(cache)  # to take the step back if the stream ends before it is wanted
        next_y, next_done = pick(run(tokens[:, None]))
        mx.async_eval(*arrays(next_y), next_done)
        pending = True

    next_y = next_done = before = None
    try:
        for n in range(max_new_tokens):
            # Token 0 goes out before step 1 is built: a one-token step reaches MLX layer by layer as it is built,
            # and MLX keeps the caller only ~10 tasks ahead of its stream, so building it takes about as long as
            # running it. Later tokens wait for the next step to be queued, so that the stream never idles.
            if 0 < n < max_new_tokens - 1:
                queue_next()
            mx.eval(*arrays(y))
            if stats is not None:
                stats.generation_tokens += stats.batch
                stats.generation_seconds = time.perf_counter() - first
            stop_now = stops is not None and bool(mx.all(y_done).item())
            yield y
            if stop_now:
                break
            if n == 0 and max_new_tokens > 1:
                queue_next()
            if pending:
                y, y_done, pending = next_y, next_done, False
    finally:
        if pending:
            _rewind(cache, before)


def _snapshot(cache):
    """What `_rewind` needs to take back one step (nothing for a cache of KV states only)."""
    return cache.snapshot() if hasattr(cache, "snapshot") and not cache.rewindable else None


def _rewind(cache, snapshot) -> None:
    """Take back the last step: a model cache rewinds each state its own way; a bare list of KV caches trims."""
    if hasattr(cache, "rewind"):
        cache.rewind(1, snapshot)
    else:
        for c in cache:
            if hasattr(c, "trim"):
                c.trim(1)


@dataclass(frozen=True)
class Generation:
    """What `generate(..., logprobs=N)` returns: the ids as without logprobs, plus per new token its
    log-probability (NaN after a row stopped) and the top N alternatives."""

    ids: mx.array  # [B, T + n]
    logprobs: mx.array  # [B, n]
    top_tokens: mx.array  # [B, n, N]
    top_logprobs: mx.array  # [B, n, N]


def generate(
    step: StepFn,
    prompt: mx.array | Sequence[int] | Sequence[Sequence[int]],
    cache: list,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    logprobs: int | None = None,
    stats: GenerationStats | None = None,
    recompute_at: int | None = None,
) -> mx.array | Generation:
    """The prompt followed by the generated tokens, `[B, T + n]` with n <= max_new_tokens (fewer on early stop);
    with `logprobs=N` a `Generation` holding those ids and the log-probabilities."""
    ids = _as_prompt(prompt)
    out = list(generate_stream(step, ids, cache, max_new_tokens, params, vocab_size=vocab_size,
                               pad_token_id=pad_token_id, logprobs=logprobs, stats=stats,
                               recompute_at=recompute_at))
    if logprobs is None:
        return ids if not out else mx.concatenate([ids, mx.stack(out, axis=1)], axis=1)
    batch, n = ids.shape[0], check_logprobs(logprobs)
    if not out:
        return Generation(ids, mx.zeros((batch, 0)), mx.zeros((batch, 0, n), mx.int32), mx.zeros((batch, 0, n)))
    return Generation(
        ids=mx.concatenate([ids, mx.stack([s.tokens for s in out], axis=1)], axis=1),
        logprobs=mx.stack([s.logprobs for s in out], axis=1),
        top_tokens=mx.stack([s.top_tokens for s in out], axis=1),
        top_logprobs=mx.stack([s.top_logprobs for s in out], axis=1),
    )
