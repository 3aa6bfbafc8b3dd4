"""Prefill and decode throughput of a loaded model, measured the same way for every model and setting."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    prefill_tps: float  # prompt tokens per second (whole batch)
    decode_tps: float  # generated tokens per second (whole batch), one token per step


def prompt_ids(vocab_size: int, prompt_len: int, batch: int = 1, seed: int = 0) -> mx.array:
    """The seeded random prompt every benchmark runs."""
    return mx.array(np.random.default_rng(seed).integers(0, vocab_size, size=(batch, prompt_len)), dtype=mx.int32)


def time_round(model, ids: mx.array, gen_len: int) -> tuple[float, float]:
    """Seconds for one prefill of `ids` and for `gen_len` greedy decode steps after it through a fresh cache."""
    cache = model.make_cache()
    t0 = time.perf_counter()
    logits = model.step(ids, cache, logits_to_keep=1)  # as generation: the head at the last position only
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token)
    t1 = time.perf_counter()
    for _ in range(gen_len):
        logits = model.step(token[:, None], cache)
        token = mx.argmax(logits[:, -1], axis=-1)
        mx.async_eval(token)
    mx.eval(token)
    return t1 - t0, time.perf_counter() - t1


def bench_model(model, prompt_len: int = 128, gen_len: int = 32, batch: int = 1, repeats: int = 3,
                seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> BenchResult:
    """Best-of-`repeats` timings after one warm-up; greedy decoding with the KV cache, no early stop."""
    ids = prompt_ids(model.vocab_size, prompt_len, batch, seed)
    best_prefill, best_decode = float("inf"), float("inf")
    for r in range(repeats + 1):
        prefill, decode = time_round(model, ids, gen_len)
        if r > 0:  # the first round warms up allocations and lazy weight loading
            best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, decode)
        if progress:
            progress(f"bench round {r}/{repeats}" + (" (warm-up)" if r == 0 else ""))
    return BenchResult(batch * prompt_len, batch * gen_len, batch * prompt_len / best_prefill, batch * gen_len / best_decode)
