"""Mamba (v1) selective scan: the prefill over a whole sequence and the single-step decode update, as Metal
kernels with plain-MLX references (which are also the fallback).

Semantics are transformers' MambaMixer in its sequential form (`mamba_selective_scan` /
`mamba_selective_state_update` without the hub kernels), with every intermediate in float32:

    dt    = softplus(delta + dt_bias)                       # [B, L, Dm]; softplus with threshold 20, as torch
    h_t   = exp(A * dt_t) * h_{t-1} + dt_t * B_t * u_t      # h: [B, Dm, N], A = -exp(A_log): [Dm, N]
    y_t   = (h_t . C_t + D * u_t) * silu(z_t)               # the gate only when z is given

Layouts (time-major, channels last — what a projection gives without transposes): u, delta, z [B, L, Dm];
B, C [B, L, N]; A [Dm, N]; D, dt_bias [Dm]; state [B, Dm, N] (float32). Decode drops the L axis.
"""

from __future__ import annotations

import mlx.core as mx

from .kernel import KernelDef, Launch, f32, run

SELECTIVE_SCAN = KernelDef(
    name="mlxc_selective_scan",
    input_names=("u", "delta", "A", "Bm", "Cm", "D", "z", "dt_bias", "h0"),
    output_names=("y", "h_out"),
    body_file="selective_scan.metal",
    cuda_body_file="selective_scan.cu",
)

SELECTIVE_STATE_UPDATE = KernelDef(
    name="mlxc_selective_state_update",
    input_names=("u", "delta", "A", "Bm", "Cm", "D", "z", "dt_bias", "state"),
    output_names=("y", "state_out"),
    body_file="selective_state_update.metal",
    cuda_body_file="selective_state_update.cu",
)

_THREADS = 256


def lanes_per_row(n: int) -> int:
    """Lanes that share one row's N states: the largest power of two dividing N, at most a SIMD-group (32)."""
    w = 1
    while w < 32 and n % (2 * w) == 0:
        w *= 2
    return w


def softplus(x: mx.array) -> mx.array:
    """torch.nn.functional.softplus (beta 1, threshold 20)."""
    return mx.where(x > 20, x, mx.log1p(mx.exp(mx.minimum(x, 20))))


def silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


# ------------------------------------------------------------------------------------------------ references


def selective_scan_reference(u, delta, A, B, C, D, z=None, dt_bias=None, state=None):
    """(y [B, L, Dm] in u's dtype, final state [B, Dm, N] float32): the sequential recurrence in MLX ops."""
    b, L, dm = u.shape
    n = A.shape[-1]
    dt = delta.astype(mx.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(mx.float32)
    dt = softplus(dt)
    A = A.astype(mx.float32)
    uf = u.astype(mx.float32)
    dA = mx.exp(dt[..., None] * A)                                  # [B, L, Dm, N]
    dBu = (dt * uf)[..., None] * B.astype(mx.float32)[:, :, None, :]  # [B, L, Dm, N]
    Cf = C.astype(mx.float32)
    h = mx.zeros((b, dm, n), mx.float32) if state is None else state.astype(mx.float32)
    ys = []
    for t in range(L):
        h = dA[:, t] * h + dBu[:, t]
        ys.append((h * Cf[:, t, None, :]).sum(-1))
    y = mx.stack(ys, axis=1) + uf * D.astype(mx.float32)
    if z is not None:
        y = y * silu(z.astype(mx.float32))
    return y.astype(u.dtype), h


def selective_state_update_reference(u, delta, A, B, C, D, state, z=None, dt_bias=None):
    """(y [B, Dm] in u's dtype, new state [B, Dm, N] in state's dtype): one step of the recurrence."""
    dt = delta.astype(mx.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(mx.float32)
    dt = softplus(dt)
    uf = u.astype(mx.float32)
    s = mx.exp(dt[..., None] * A.astype(mx.float32)) * state.astype(mx.float32) \
        + (dt * uf)[..., None] * B.astype(mx.float32)[:, None, :]
    y = (s * C.astype(mx.float32)[:, None, :]).sum(-1) + uf * D.astype(mx.float32)
    if z is not None:
        y = y * silu(z.astype(mx.float32))
    return y.astype(u.dtype), s.astype(state.dtype)


# ------------------------------------------------------------------------------------------------ launches


def _dummy(dtype=mx.float32) -> mx.array:
    return mx.zeros((1,), dtype)


def selective_scan_launch(u, delta, A, B, C, D, z=None, dt_bias=None, state=None) -> Launch:
    b, L, dm = u.shape
    n = A.shape[-1]
    w = lanes_per_row(n)
    inputs = [u, delta, f32(A), B, C, f32(D), z if z is not None else _dummy(u.dtype),
              f32(dt_bias) if dt_bias is not None else mx.zeros((dm,), mx.float32),
              f32(state) if state is not None else _dummy()]
    threads = dm * w
    return Launch(inputs=inputs, output_shapes=[(b, L, dm), (b, dm, n)], output_dtypes=[u.dtype, mx.float32],
                  grid=(threads, b, 1), threadgroup=(min(_THREADS, threads), 1, 1),
                  template=[("T", u.dtype), ("N", n), ("W", w), ("HAS_Z", z is not None),
                            ("HAS_H0", state is not None)])


def selective_state_update_launch(u, delta, A, B, C, D, state, z=None, dt_bias=None) -> Launch:
    b, dm = u.shape
    n = A.shape[-1]
    w = lanes_per_row(n)
    inputs = [u, delta, f32(A), B, C, f32(D), z if z is not None else _dummy(u.dtype),
              f32(dt_bias) if dt_bias is not None else mx.zeros((dm,), mx.float32), state]
    threads = dm * w
    return Launch(inputs=inputs, output_shapes=[(b, dm), (b, dm, n)], output_dtypes=[u.dtype, state.dtype],
                  grid=(threads, b, 1), threadgroup=(min(_THREADS, threads), 1, 1),
                  template=[("T", u.dtype), ("S", state.dtype), ("N", n), ("W", w), ("HAS_Z", z is not None)])


# ------------------------------------------------------------------------------------------------ ops


def selective_scan(u, delta, A, B, C, D, z=None, dt_bias=None, state=None, impl: str = "reference"):
    """Prefill: (y, final state). impl: "reference" (MLX ops), "metal", "emulated" or "cuda"."""
    if impl == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, dt_bias, state)
    y, h = run(SELECTIVE_SCAN, selective_scan_launch(u, delta, A, B, C, D, z, dt_bias, state), impl)
    return y, h


def selective_state_update(u, delta, A, B, C, D, state, z=None, dt_bias=None, impl: str = "reference"):
    """Decode: (y, new state) for one token."""
    if impl == "reference":
        return selective_state_update_reference(u, delta, A, B, C, D, state, z, dt_bias)
    y, s = run(SELECTIVE_STATE_UPDATE, selective_state_update_launch(u, delta, A, B, C, D, state, z, dt_bias), impl)
    return y, s
