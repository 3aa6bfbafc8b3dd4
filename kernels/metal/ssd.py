"""Mamba-2: the single-step state update (decode) and the chunked SSD prefill, as Metal kernels with plain-MLX
references (also the fallback).

Semantics are transformers' Mamba2Mixer.torch_forward (`mamba2_chunk_scan` / `mamba2_selective_state_update`
without the hub kernels), every intermediate in float32. Per head h, with its group g = h // (H // G):

    dt    = softplus(dt + dt_bias[h]), clamped to dt_limit when given     # [B, L, H]
    S_t   = exp(A[h] * dt_t) * S_{t-1} + dt_t * x_t B_t^T                  # S: [B, H, P, N], A = -exp(A_log): [H]
    y_t   = S_t C_t + D[h] * x_t                                           # [B, L, H, P]

Layouts: x [B, L, H, P]; dt [B, L, H]; B, C [B, L, G, N]; A, D, dt_bias [H]; state [B, H, P, N]. Decode drops L.
transformers clamps dt to `time_step_limit` in the chunked scan but not in its single-step update: `dt_limit` is an
argument of both here, and whoever wires them decides (pass None for the step to match transformers exactly).
"""

from __future__ import annotations

import mlx.core as mx

from .kernel import KernelDef, Launch, f32, run
from .scan import lanes_per_row, softplus

MAMBA2_STATE_UPDATE = KernelDef(
    name="mlxc_mamba2_state_update",
    input_names=("x", "dt_in", "A", "Bm", "Cm", "D", "dt_bias", "dt_limit", "state"),
    output_names=("y", "state_out"),
    body_file="mamba2_state_update.metal",
    cuda_body_file="mamba2_state_update.cu",
)

MAMBA2_CHUNK_SCAN = KernelDef(
    name="mlxc_mamba2_chunk_scan",
    input_names=("x", "dt_in", "A", "Bm", "Cm", "D", "dt_bias", "dt_limit", "h0"),
    output_names=("y", "h_out"),
    body_file="mamba2_chunk_scan.metal",
    cuda_body_file="mamba2_chunk_scan.cu",
)

_THREADS = 256
_CHUNK_THREADS = 128
_TG_BYTES = 32768


def _dt(dt, dt_bias, dt_limit):
    dt = dt.astype(mx.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(mx.float32)
    dt = softplus(dt)
    if dt_limit is not None:
        dt = mx.clip(dt, float(dt_limit[0]), float(dt_limit[1]))
    return dt


# ------------------------------------------------------------------------------------------------ references


def mamba2_state_update_reference(x, dt, A, B, C, D, state, dt_bias=None, dt_limit=None):
    """(y [B, H, P] in x's dtype, new state [B, H, P, N] in state's dtype)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    dt = _dt(dt, dt_bias, dt_limit).reshape(b, g, h // g)            # [B, G, R]: head g * R + r uses group g
    xf = x.astype(mx.float32).reshape(b, g, h // g, p)
    Bg = B.astype(mx.float32)[:, :, None, None, :]                   # [B, G, 1, 1, N]
    Cg = C.astype(mx.float32)[:, :, None, :, None]                   # [B, G, 1, N, 1]
    dA = mx.exp(dt * A.astype(mx.float32).reshape(g, h // g))       # [B, G, R]
    s = state.astype(mx.float32).reshape(b, g, h // g, p, n)
    s = dA[..., None, None] * s + (dt[..., None] * xf)[..., None] * Bg
    y = (s @ Cg)[..., 0] + D.astype(mx.float32).reshape(g, h // g)[..., None] * xf
    return y.reshape(b, h, p).astype(x.dtype), s.reshape(b, h, p, n).astype(state.dtype)


def mamba2_scan_sequential(x, dt, A, B, C, D, dt_bias=None, dt_limit=None, state=None):
    """The recurrence one step at a time (the definition; slow, for tests)."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    s = mx.zeros((b, h, p, n), mx.float32) if state is None else state.astype(mx.float32)
    ys = []
    for t in range(L):
        y, s = mamba2_state_update_reference(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, s, dt_bias, dt_limit)
        ys.append(y)
    return mx.stack(ys, axis=1), s


def mamba2_chunk_scan_reference(x, dt, A, B, C, D, dt_bias=None, dt_limit=None, state=None, chunk: int = 64):
    """(y [B, L, H, P] in x's dtype, final state [B, H, P, N] float32): transformers' chunked SSD in MLX ops —
    quadratic inside chunks of `chunk` steps, recurrent across them. Heads are laid out [G, R] (head g * R + r reads
    group g), so B and C products are computed once per group and broadcast over its R heads."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    dt = _dt(dt, dt_bias, dt_limit)                                 # [b, L, h]
    xdt = x.astype(mx.float32) * dt[..., None]                      # [b, L, h, p]
    a = dt * A.astype(mx.float32)                                   # [b, L, h]
    Bf, Cf = B.astype(mx.float32), C.astype(mx.float32)             # [b, L, g, n]
    pad = (-L) % chunk
    if pad:
        def padded(t):
            return mx.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        Bf, Cf, xdt, a = padded(Bf), padded(Cf), padded(xdt), padded(a)
    c = (L + pad) // chunk
    Bc = Bf.reshape(b, c, chunk, g, 1, n).transpose(0, 1, 3, 4, 2, 5)   # [b, c, g, 1, l, n]
    Cc = Cf.reshape(b, c, chunk, g, 1, n).transpose(0, 1, 3, 4, 2, 5)
    xc = xdt.reshape(b, c, chunk, g, r, p).transpose(0, 1, 3, 4, 2, 5)  # [b, c, g, r, l, p]
    acum = mx.cumsum(a.reshape(b, c, chunk, g, r).transpose(0, 1, 3, 4, 2), axis=-1)  # [b, c, g, r, l]
    causal = mx.tril(mx.ones((chunk, chunk), mx.bool_))
    seg = mx.where(causal, acum[..., :, None] - acum[..., None, :], -mx.inf)
    y = ((Cc @ Bc.swapaxes(-1, -2)) * mx.exp(seg)) @ xc             # [b, c, g, r, l, p]: within each chunk
    decay = mx.exp(acum[..., -1:] - acum)                           # [b, c, g, r, l]
    chunk_states = (xc * decay[..., None]).swapaxes(-1, -2) @ Bc    # [b, c, g, r, p, n]
    s = mx.zeros((b, g, r, p, n), mx.float32) if state is None else state.astype(mx.float32).reshape(b, g, r, p, n)
    last = mx.exp(acum[..., -1])                                    # [b, c, g, r]
    starts = []
    for i in range(c):
        starts.append(s)
        s = last[:, i, ..., None, None] * s + chunk_states[:, i]
    start = mx.stack(starts, axis=1)                                # [b, c, g, r, p, n]
    y = y + (Cc @ start.swapaxes(-1, -2)) * mx.exp(acum)[..., None]  # + from the state each chunk starts in
    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, c * chunk, h, p)[:, :L]
    y = y + x.astype(mx.float32) * D.astype(mx.float32)[:, None]
    return y.astype(x.dtype), s.reshape(b, h, p, n)


# ------------------------------------------------------------------------------------------------ launches


def _limit(dt_limit):
    return f32(list(dt_limit) if dt_limit is not None else [0.0, float("inf")])


def mamba2_state_update_launch(x, dt, A, B, C, D, state, dt_bias=None, dt_limit=None) -> Launch:
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    w = lanes_per_row(n)
    inputs = [x, dt, f32(A), B, C, f32(D), f32(dt_bias) if dt_bias is not None else mx.zeros((h,), mx.float32),
              _limit(dt_limit), state]
    threads = p * w
    return Launch(inputs=inputs, output_shapes=[(b, h, p), (b, h, p, n)], output_dtypes=[x.dtype, state.dtype],
                  grid=(threads, h, b), threadgroup=(min(_THREADS, threads), 1, 1),
                  template=[("T", x.dtype), ("S", state.dtype), ("N", n), ("W", w), ("H", h), ("G", g), ("P", p),
                            ("DT_LIMIT", dt_limit is not None)])


def chunk_tiles(n: int, p: int) -> tuple[int, int]:
    """(Q, PT): steps per chunk (<= 32: one SIMD-group scans the decay) and head-dim slice per threadgroup, the
    largest that keep the threadgroup memory (B, C, x, state slices, the Q x Q matrix) within 32 KiB."""
    pt = max(d for d in range(1, min(p, 16) + 1) if p % d == 0)
    for q in (32, 16, 8, 4, 2, 1):
        if 4 * (2 * q * n + q * pt + pt * n + q * q + 2 * q) <= _TG_BYTES:
            return q, pt
    raise ValueError(f"state size {n} too large for the chunked scan's threadgroup memory")


def mamba2_chunk_scan_launch(x, dt, A, B, C, D, dt_bias=None, dt_limit=None, state=None) -> Launch:
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q, pt = chunk_tiles(n, p)
    inputs = [x, dt, f32(A), B, C, f32(D), f32(dt_bias) if dt_bias is not None else mx.zeros((h,), mx.float32),
              _limit(dt_limit), f32(state) if state is not None else mx.zeros((1,), mx.float32)]
    return Launch(inputs=inputs, output_shapes=[(b, L, h, p), (b, h, p, n)], output_dtypes=[x.dtype, mx.float32],
                  grid=(_CHUNK_THREADS, h * (p // pt), b), threadgroup=(_CHUNK_THREADS, 1, 1),
                  template=[("T", x.dtype), ("N", n), ("P", p), ("H", h), ("G", g), ("Q", q), ("PT", pt),
                            ("TG", _CHUNK_THREADS), ("DT_LIMIT", dt_limit is not None),
                            ("HAS_H0", state is not None)])


# ------------------------------------------------------------------------------------------------ ops


def mamba2_state_update(x, dt, A, B, C, D, state, dt_bias=None, dt_limit=None, impl: str = "reference"):
    """Decode: (y, new state) for one token. impl: "reference", "metal", "emulated" or "cuda"."""
    if impl == "reference":
        return mamba2_state_update_reference(x, dt, A, B, C, D, state, dt_bias, dt_limit)
    y, s = run(MAMBA2_STATE_UPDATE, mamba2_state_update_launch(x, dt, A, B, C, D, state, dt_bias, dt_limit), impl)
    return y, s


def mamba2_chunk_scan(x, dt, A, B, C, D, dt_bias=None, dt_limit=None, state=None, impl: str = "reference",
                      chunk: int = 64):
    """Prefill: (y, final state). The reference is chunked by `chunk`; the kernel picks its own chunk (the result is
    the same recurrence either way)."""
    if impl == "reference":
        return mamba2_chunk_scan_reference(x, dt, A, B, C, D, dt_bias, dt_limit, state, chunk)
    y, s = run(MAMBA2_CHUNK_SCAN, mamba2_chunk_scan_launch(x, dt, A, B, C, D, dt_bias, dt_limit, state), impl)
    return y, s
