"""Attention over a KV cache: a decode kernel (one query per head) and a prefill kernel (tiled over queries and
keys), with the plain-MLX reference that is also the fallback.

What they compute is codegen/templates/attention.py.j2's attention: causal, keys in time order ending at the
newest query, an optional sliding window by position (a query sees keys fewer than `window` positions back, itself
included), an optional logit soft-cap (softcap * tanh(score / softcap), applied to the scaled scores before the
mask), GQA by head index, softmax in float32.

K and V are read straight from the cache layout: `k`, `v` are a cache's whole buffers `[B, Hkv, capacity, D]`
(runtime/cache.py preallocates them) and `kv_start`, `kv_len` say which positions hold the keys to attend to, so
no slice of the buffer is copied. Queries are `[B, Hq, T, D]` (T = 1 for decode).
"""

from __future__ import annotations

import mlx.core as mx

from .kernel import KernelDef, Launch, f32, run

ATTENTION_DECODE = KernelDef(
    name="mlxc_attention_decode",
    input_names=("q", "k", "v", "params", "fparams"),
    output_names=("out",),
    body_file="attention_decode.metal",
    cuda_body_file="attention_decode.cu",
)

ATTENTION_PREFILL = KernelDef(
    name="mlxc_attention_prefill",
    input_names=("q", "k", "v", "params", "fparams"),
    output_names=("out",),
    body_file="attention_prefill.metal",
    cuda_body_file="attention_prefill.cu",
)

_DECODE_SIMDGROUPS = 4
_PREFILL_SIMDGROUPS = 4
_QUERIES_PER_SIMDGROUP = 2
_TILE_BYTES = 16384  # K and V tiles of the prefill kernel, float


def _range(k: mx.array, kv_start: int, kv_len: int | None) -> tuple[int, int]:
    cap = k.shape[2]
    if kv_len is None:
        kv_len = cap - kv_start
    if kv_start < 0 or kv_len < 1 or kv_start + kv_len > cap:
        raise ValueError(f"keys {kv_start}..{kv_start + (kv_len or 0) - 1} are outside a cache of {cap} positions")
    return kv_start, kv_len


def attention_reference(q, k, v, scale: float, window: int | None = None, softcap: float | None = None,
                        kv_start: int = 0, kv_len: int | None = None) -> mx.array:
    """The MLX ops: `mx.fast.scaled_dot_product_attention` with the mask by position, or, with a soft-cap (which the
    fused op lacks), the scores written out with a float32 softmax."""
    kv_start, kv_len = _range(k, kv_start, kv_len)
    k = k[:, :, kv_start:kv_start + kv_len]
    v = v[:, :, kv_start:kv_start + kv_len]
    T, S = q.shape[2], k.shape[2]
    q_pos = mx.arange(S - T, S)[:, None]
    k_pos = mx.arange(S)[None]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (q_pos - k_pos < window)
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    repeats = q.shape[1] // k.shape[1]
    if repeats > 1:
        k, v = mx.repeat(k, repeats, axis=1), mx.repeat(v, repeats, axis=1)
    scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
    scores = mx.tanh(scores / softcap) * softcap
    scores = mx.where(mask, scores, -mx.inf)
    return (mx.softmax(scores, axis=-1) @ v.astype(mx.float32)).astype(q.dtype)


def _common(q, k, scale, window, softcap, kv_start, kv_len):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    kv_start, kv_len = _range(k, kv_start, kv_len)
    if kv_len < t:
        raise ValueError(f"{t} queries need at least {t} keys (their own positions), got {kv_len}")
    params = mx.array([kv_start, kv_len], dtype=mx.int32)
    fparams = f32([scale, softcap if softcap is not None else 1.0])
    feats = [("GQA", hq // hkv), ("WINDOW", int(window or 0)), ("SOFTCAP", softcap is not None)]
    return b, hq, t, d, params, fparams, feats


def attention_decode_launch(q, k, v, scale, window=None, softcap=None, kv_start=0, kv_len=None) -> Launch:
    b, hq, t, d, params, fparams, feats = _common(q, k, scale, window, softcap, kv_start, kv_len)
    if t != 1:
        raise ValueError(f"the decode kernel takes one query per head, got {t}")
    nsg = _DECODE_SIMDGROUPS
    return Launch(inputs=[q, k, v, params, fparams], output_shapes=[q.shape], output_dtypes=[q.dtype],
                  grid=(32 * nsg, hq, b), threadgroup=(32 * nsg, 1, 1),
                  template=[("T", q.dtype), ("D", d), *feats, ("NSG", nsg)])


def prefill_key_tile(d: int) -> int:
    return max(1, min(32, _TILE_BYTES // (8 * d)))


def attention_prefill_launch(q, k, v, scale, window=None, softcap=None, kv_start=0, kv_len=None) -> Launch:
    b, hq, t, d, params, fparams, feats = _common(q, k, scale, window, softcap, kv_start, kv_len)
    nsg, qps = _PREFILL_SIMDGROUPS, _QUERIES_PER_SIMDGROUP
    tiles = -(-t // (nsg * qps))
    return Launch(inputs=[q, k, v, params, fparams], output_shapes=[q.shape], output_dtypes=[q.dtype],
                  grid=(32 * nsg, hq * tiles, b), threadgroup=(32 * nsg, 1, 1),
                  template=[("T", q.dtype), ("D", d), *feats, ("NSG", nsg), ("QPS", qps),
                            ("BK", prefill_key_tile(d))])


def attention(q, k, v, scale: float, window: int | None = None, softcap: float | None = None, kv_start: int = 0,
              kv_len: int | None = None, impl: str = "reference") -> mx.array:
    """Attention of q [B, Hq, T, D] over cache buffers k, v [B, Hkv, capacity, D] (positions kv_start ..
    kv_start + kv_len - 1). impl: "reference", "metal", "emulated" or "cuda"; T == 1 takes the decode kernel."""
    if impl == "reference":
        return attention_reference(q, k, v, scale, window, softcap, kv_start, kv_len)
    if q.shape[2] == 1:
        return run(ATTENTION_DECODE, attention_decode_launch(q, k, v, scale, window, softcap, kv_start, kv_len),
                   impl)[0]
    return run(ATTENTION_PREFILL, attention_prefill_launch(q, k, v, scale, window, softcap, kv_start, kv_len),
               impl)[0]
