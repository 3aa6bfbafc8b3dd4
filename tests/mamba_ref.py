"""Shared by the Mamba tests: the selective scan written out in float64 numpy (the reference the MLX, native and
emulated scans are held to) and Mamba's own parametrization of random transformers weights."""

from __future__ import annotations

import numpy as np


def numpy_scan(u, delta, A, B, C, D, dt_bias, z=None, h=None):
    """The recurrence one step at a time in float64 (softplus as torch's, linear above 20); returns (y, last h)."""
    u, delta, A, B, C, D, dt_bias = (np.asarray(v, np.float64) for v in (u, delta, A, B, C, D, dt_bias))
    d = delta + dt_bias
    d = np.where(d > 20, d, np.log1p(np.exp(np.minimum(d, 20))))
    b, T, dm = u.shape
    h = np.zeros((b, dm, A.shape[1])) if h is None else np.asarray(h, np.float64)
    ys = []
    for t in range(T):
        h = np.exp(d[:, t, :, None] * A) * h + (d[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    y = np.stack(ys, axis=1)
    if z is not None:
        z = np.asarray(z, np.float64)
        y = y * z / (1 + np.exp(-z))
    return y, h


def mamba_dynamics(model, seed: int, dt_max: float, d_noise: float | None = None) -> None:
    """Mamba's parametrization over a transformers model's random weights: A = -(1..N) with noise, dt log-uniform
    from 1e-3 to `dt_max` (set through dt_proj's bias, softplus^-1(dt)), and with `d_noise` the skip D = 1 + noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                n = p.shape[-1]
                p.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(p)
                        + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_proj.bias"):
                dt = torch.exp(torch.empty(p.shape).uniform_(np.log(1e-3), np.log(dt_max), generator=g))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif d_noise is not None and name.endswith(".D"):
                p.copy_(1.0 + d_noise * torch.randn(p.shape, generator=g))
