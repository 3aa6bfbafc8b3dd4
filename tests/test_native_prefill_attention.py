"""`native.attention`, causal attention for T >= 1 queries (a prompt's, or a decode step's), against
`mx.fast.scaled_dot_product_attention` with MLX's own masks: the string "causal" without a window, else the boolean
mask 0 <= (S - T + t) - j < window (the independent reference).

Tolerances (relative to max(1, the output's largest magnitude)). Float32: both sides compute in float32, so they
agree to 1e-5. Half precision: the kernel rounds q * scale and the softmax probabilities to the dtype (as
`attention_decode` does) and sums in float32; MLX's composition also rounds the scores and its matmuls' outputs to the
dtype. Over this file's shapes the two differ by up to 1.8e-3 (float16) and 1.5e-2 (bfloat16), while the kernel is
within 1.0e-3 and 7.1e-3 of float32 attention on the same inputs (MLX's composition: 2.1e-3 and 1.4e-2); the bounds
below leave a factor of two.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import mlx.core as mx

from mlxc.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")

TOL = {mx.float32: 1e-5, mx.float16: 4e-3, mx.bfloat16: 3.2e-2}  # half: ~4 units in the last place at 1

HEADS = [(16, 8), (9, 3), (4, 4), (8, 1)]


@pytest.fixture
def isa_restored():
    yield
    native.set_isa("auto")
    native.set_threads(0)


def _arr(rng, shape, dtype):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _inputs(rng, b, hq, hkv, t, s, d, dtype):
    return _arr(rng, (b, hq, t, d), dtype), _arr(rng, (b, hkv, s, d), dtype), _arr(rng, (b, hkv, s, d), dtype)


def _mask(t, s, window):
    """MLX's mask for T queries at the last T of S positions: "causal", or the window's boolean mask."""
    if not window or window >= s:
        return "causal"
    d = mx.arange(s - t, s)[:, None] - mx.arange(s)[None, :]
    return (d >= 0) & (d < window)


def _reference(q, k, v, scale, window=0):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=_mask(q.shape[2], k.shape[2], window))


def _close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


# ------------------------------------------------------------------------------------------------ values

# Every query count with every cache length before the prompt and every head layout, the head dims taken in turn.
CASES = [(t, past, heads, (64, 80, 32)[i % 3])
         for i, (t, past, heads) in enumerate(itertools.product((1, 2, 7, 64, 130), (0, 5, 100), HEADS))]


@pytest.mark.parametrize("window", [0, 3, 1000])
@pytest.mark.parametrize("t, past, heads, d", CASES)
def test_float32_matches_mlx(t, past, heads, d, window):
    rng = np.random.default_rng(t * 1000 + past + window)
    hq, hkv = heads
    q, k, v = _inputs(rng, 2, hq, hkv, t, t + past, d, mx.float32)
    scale = d ** -0.5
    _close(native.attention(q, k, v, scale=scale, window=window), _reference(q, k, v, scale, window), TOL[mx.float32])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("t, past, heads, d, window",
                         [(1, 5, (9, 3), 64, 0), (7, 0, (16, 8), 64, 0), (64, 100, (8, 1), 32, 3),
                          (130, 5, (4, 4), 80, 1000), (130, 100, (9, 3), 64, 0)])
def test_half_precision_matches_mlx(t, past, heads, d, window, dtype):
    rng = np.random.default_rng(7 * t + past)
    q, k, v = _inputs(rng, 2, *heads, t, t + past, d, dtype)
    got = native.attention(q, k, v, scale=d ** -0.5, window=window)
    _close(got, _reference(q, k, v, d ** -0.5, window), TOL[dtype])


def test_decode_is_attention_decode():
    """One query per head: half precision runs the decode kernel (the same bits as attention_decode), float32 the
    blocked kernel (the same values up to float32 rounding), windows included."""
    rng = np.random.default_rng(1)
    for dtype in (mx.float32, mx.bfloat16):
        q, k, v = _inputs(rng, 2, 9, 3, 1, 40, 64, dtype)
        for window in (0, 3, 100):
            got = np.array(native.attention(q, k, v, scale=0.125, window=window).astype(mx.float32))
            want = np.array(native.attention_decode(q, k, v, scale=0.125, window=window).astype(mx.float32))
            if dtype == mx.float32:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            else:
                assert np.array_equal(got, want)


def test_value_head_dim_may_differ():
    rng = np.random.default_rng(2)
    q, k = _arr(rng, (1, 4, 9, 32), mx.float32), _arr(rng, (1, 2, 12, 32), mx.float32)
    v = _arr(rng, (1, 2, 12, 48), mx.float32)
    _close(native.attention(q, k, v, scale=0.2), _reference(q, k, v, 0.2), TOL[mx.float32])


# ------------------------------------------------------------------------------------------------ strides

@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_strided_views(dtype):
    """k and v as a KV cache's views (a buffer with slack past S, a [B, S, H, D] layout transposed, every other
    feature), q transposed from [B, T, H, D]."""
    rng = np.random.default_rng(3)
    b, hq, hkv, t, s, d = 2, 8, 4, 20, 50, 64
    q = _arr(rng, (b, t, hq, d), dtype).transpose(0, 2, 1, 3)
    slack_k, slack_v = _arr(rng, (b, hkv, 64, d), dtype), _arr(rng, (b, hkv, 64, d), dtype)
    views = [
        (slack_k[:, :, :s], slack_v[:, :, :s]),
        (_arr(rng, (b, s, hkv, d), dtype).transpose(0, 2, 1, 3), _arr(rng, (b, s + 3, hkv, d), dtype)[:, 3:]
         .transpose(0, 2, 1, 3)),
        (_arr(rng, (b, hkv, s, 2 * d), dtype)[..., ::2], _arr(rng, (b, hkv, s, 2 * d), dtype)[..., 1::2]),
    ]
    for k, v in views:
        for window in (0, 7):
            want = _reference(mx.contiguous(q), mx.contiguous(k), mx.contiguous(v), 0.125, window)
            _close(native.attention(q, k, v, scale=0.125, window=window), want, TOL[dtype])


# ------------------------------------------------------------------------------------------------ ISAs and threads

def test_every_isa_and_thread_count(isa_restored):
    """Each instruction set's helpers, on one thread and on two (a prompt large enough to split over threads, and
    a small one that stays on one)."""
    rng = np.random.default_rng(4)
    shapes = [(2, 16, 8, 130, 100, 64, 0), (1, 9, 3, 128, 0, 64, 0), (2, 8, 1, 64, 5, 80, 3), (1, 4, 4, 7, 5, 32, 0)]
    inputs = []
    for b, hq, hkv, t, past, d, window in shapes:
        q, k, v = _inputs(rng, b, hq, hkv, t, t + past, d, mx.float32)
        hk = _inputs(rng, b, hq, hkv, t, t + past, d, mx.float16)
        inputs.append((q, k, v, window, _reference(q, k, v, d ** -0.5, window), hk,
                       _reference(*hk, d ** -0.5, window)))
    for isa in native.supported_isas():
        native.set_isa(isa)
        for threads in (1, 2):
            native.set_threads(threads)
            for q, k, v, window, want, hk, hwant in inputs:
                scale = q.shape[-1] ** -0.5
                _close(native.attention(q, k, v, scale=scale, window=window), want, TOL[mx.float32])
                _close(native.attention(*hk, scale=scale, window=window), hwant, TOL[mx.float16])


# ------------------------------------------------------------------------------------------------ transformations

@pytest.mark.parametrize("t, past, window", [(7, 5, 0), (7, 5, 3), (6, 0, 100), (1, 4, 2)])
def test_gradients_equal_mlx(t, past, window):
    rng = np.random.default_rng(5 + t + window)
    q, k, v = _inputs(rng, 2, 6, 2, t, t + past, 32, mx.float32)
    cot = _arr(rng, (2, 6, t, 32), mx.float32)

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * cot).sum()

    got = mx.grad(loss(lambda q, k, v: native.attention(q, k, v, scale=0.3, window=window)), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss(lambda q, k, v: _reference(q, k, v, 0.3, window)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        _close(g, w, TOL[mx.float32])


def test_compiled_and_shapeless():
    rng = np.random.default_rng(6)
    f = lambda q, k, v: native.attention(q, k, v, scale=0.125)  # noqa: E731
    shapeless = mx.compile(f, shapeless=True)
    for t, past in ((5, 3), (9, 0), (1, 12)):
        q, k, v = _inputs(rng, 1, 4, 2, t, t + past, 64, mx.float32)
        want = _reference(q, k, v, 0.125)
        _close(mx.compile(f)(q, k, v), want, TOL[mx.float32])
        _close(shapeless(q, k, v), want, TOL[mx.float32])


# ------------------------------------------------------------------------------------------------ errors

def test_errors():
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, 1, 4, 2, 5, 8, 16, mx.float32)
    bad = [
        ((q[0], k, v), {}, "must be \\[B, Hq, T, D\\]"),
        ((q, k.astype(mx.float16), v), {}, "share one dtype"),
        ((q.astype(mx.int32), k.astype(mx.int32), v.astype(mx.int32)), {}, "share one dtype"),
        ((q, k, v[:, :, :7]), {}, "like each other"),
        ((q, k[:1, :1], v[:1, :1]), {}, None),  # fine: 4 heads over 1
        ((q[:, :3], k, v), {}, "multiple of key heads"),
        ((q[..., :8], k, v), {}, "head dims differ"),
        ((q, k[:, :, :4], v[:, :, :4]), {}, "fewer than T = 5"),
        ((q, k, v), {"window": -1}, "window"),
        ((mx.concatenate([q, q]), k, v), {}, "batch"),
    ]
    for args, kw, match in bad:
        if match is None:
            native.attention(*args, scale=1.0, **kw)
            continue
        with pytest.raises(ValueError, match=match):
            native.attention(*args, scale=1.0, **kw)
