"""Perplexity of a token sequence in sliding windows, the convention of transformers' "perplexity of fixed-length
models" guide: windows of `context` tokens start every `stride` tokens, and each window scores only the tokens the
previous window did not (each with as much context as its window gives it). With `stride == context` the windows do
not overlap and a window's first token, having no context, is not scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx

from ..ir.errors import MlxcError

DEFAULT_CONTEXT = 512


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    tokens: int  # how many tokens were scored
    nll: float  # their mean negative log-likelihood, in nats
    context: int
    stride: int
    windows: int

    def __float__(self) -> float:
        return self.perplexity


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over `n` tokens that scores something (a one-token window
    at the end, with `stride == context`, has nothing to predict from)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        if max(prev_end, begin + 1) < end:
            out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def perplexity(model, text: Optional[str] = None, *, ids: Optional[Sequence[int]] = None,
               context: Optional[int] = None, stride: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> Perplexity:
    """Perplexity of `text` (encoded with the model's tokenizer, special tokens as the tokenizer adds them) or of
    token `ids` under a loaded model. `context` defaults to 512 (at most the model's context length), `stride` to
    half the context. `progress(done, total)` is called after each window."""
    model.require_causal_lm("perplexity")  # a classifier's logits are not next-token distributions
    if (text is None) == (ids is None):
        raise MlxcError("give the text or the token ids to score, one of them")
    if text is not None:
        if model.tokenizer is None:
            raise MlxcError(f"{model.source} has no tokenizer to encode the text")
        ids = model.tokenizer.encode(text)
    ids = [int(i) for i in ids]
    limit = model.context_length
    if context is None:
        context = min(DEFAULT_CONTEXT, limit) if limit else DEFAULT_CONTEXT
    if context < 2:
        raise MlxcError(f"--context must be at least 2 tokens (one to predict from, one to score), got {context}")
    if limit and context > limit:
        raise MlxcError(f"--context {context} exceeds the model's context length ({limit} tokens)")
    if stride is None:
        stride = max(1, context // 2)
    if not 1 <= stride <= context:
        raise MlxcError(f"--stride must be between 1 and the context ({context}), got {stride}: a larger stride "
                        "would skip tokens")
    if len(ids) < 2:
        raise MlxcError(f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long; perplexity needs at "
                        "least 2")
    model.check_ids(ids)
    spans = windows(len(ids), context, stride)
    total_nll, scored = 0.0, 0
    for i, (begin, end, first) in enumerate(spans, 1):
        window = mx.array([ids[begin:end]])
        logits = model(window).logits[0].astype(mx.float32)
        # position j is predicted by the logits at j - 1
        pred = logits[first - 1 - begin : end - 1 - begin]
        targets = mx.array(ids[first:end])
        logprobs = pred - mx.logsumexp(pred, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum()
        total_nll += nll.item()
        scored += end - first
        if progress:
            progress(i, len(spans))
    mean = total_nll / scored
    return Perplexity(math.exp(mean), scored, mean, context, stride, len(spans))
