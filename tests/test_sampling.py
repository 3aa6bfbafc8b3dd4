"""Sampling must filter exactly as transformers' logits processors do, and be reproducible when seeded."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlxc.ir.errors import MlxcError
from mlxc.runtime.sampling import Sampler, SamplingParams, filter_logits

V = 97


def _reference(logits: np.ndarray, history: np.ndarray, p: SamplingParams) -> np.ndarray:
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.temperature not in (0.0, 1.0):
        procs.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs(torch.from_numpy(history).long(), torch.from_numpy(logits)).numpy()


PARAMS = [
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=10),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_k=500),  # k above vocab size
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.05),  # usually keeps only the max
    SamplingParams(temperature=0.8, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=30, top_p=0.95, repetition_penalty=0.8),
    SamplingParams(temperature=0.6, top_p=0.7, min_p=0.05, repetition_penalty=1.1),
    SamplingParams(repetition_penalty=1.5),  # greedy: only the penalty applies
]


@pytest.mark.parametrize("params", PARAMS, ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_logits_matches_transformers(params: SamplingParams, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    history = rng.integers(0, V, size=(4, 12))
    got = np.array(filter_logits(mx.array(logits), params, mx.array(history)))
    want = _reference(logits, history, params)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    kept = ~np.isneginf(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6, atol=1e-6)


def test_repetition_penalty_ragged_history_and_out_of_vocab_ids() -> None:
    logits = np.array([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]], dtype=np.float32)
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    got = np.array(filter_logits(mx.array(logits), p, [[0, 1, 1, 9], [3]]))
    np.testing.assert_allclose(got, [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.25]])


def test_greedy_is_argmax() -> None:
    logits = mx.array(np.random.default_rng(3).standard_normal((5, V)).astype(np.float32))
    got = Sampler(SamplingParams())(logits)
    assert got.dtype == mx.int32 and got.shape == (5,)
    np.testing.assert_array_equal(np.array(got), np.argmax(np.array(logits), axis=-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = mx.array(np.random.default_rng(4).standard_normal((3, V)).astype(np.float32))
    p = SamplingParams(temperature=1.0, top_k=40, seed=1234)
    s1, s2 = Sampler(p), Sampler(p)
    run1 = [np.array(s1(logits)) for _ in range(20)]
    run2 = [np.array(s2(logits)) for _ in range(20)]
    np.testing.assert_array_equal(run1, run2)
    assert len({tuple(r) for r in run1}) > 1  # the key advances between calls
    s3 = Sampler(SamplingParams(temperature=1.0, top_k=40, seed=99))
    assert [np.array(s3(logits)).tolist() for _ in range(20)] != [r.tolist() for r in run1]


def test_samples_respect_filters() -> None:
    logits = mx.array(np.random.default_rng(5).standard_normal((1, V)).astype(np.float32))
    allowed = set(np.argsort(-np.array(logits)[0])[:5].tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=0))
    draws = mx.concatenate([s(mx.broadcast_to(logits, (256, V))) for _ in range(4)])
    assert set(np.array(draws).tolist()) <= allowed


def test_temperature_sampling_distribution() -> None:
    base = np.log(np.array([0.5, 0.25, 0.15, 0.1], dtype=np.float32))
    temperature, n = 0.5, 20000
    expected = np.exp(base / temperature)
    expected /= expected.sum()
    s = Sampler(SamplingParams(temperature=temperature, seed=7))
    draws = np.array(s(mx.broadcast_to(mx.array(base)[None], (n, 4))))
    freq = np.bincount(draws, minlength=4) / n
    # Standard error is below 0.004 here; 0.02 is > 5 sigma, so this cannot flake but still catches a wrong T.
    np.testing.assert_allclose(freq, expected, atol=0.02)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"stop_tokens": (1, -2)}, "stop_tokens"),
    ],
)
def test_invalid_params(kwargs: dict, match: str) -> None:
    with pytest.raises(MlxcError, match=match):
        SamplingParams(**kwargs)


def test_params_normalise_stop_tokens() -> None:
    assert SamplingParams(stop_tokens=[3, np.int64(5)]).stop_tokens == (3, 5)
    assert SamplingParams(stop_tokens=7).stop_tokens == (7,)
