"""The Mamba-2 mixer (`Mamba2Spec`), as transformers' Mamba2Mixer computes it:

    gate, xBC, dt = split(in_proj(x))                      # [I], [I + 2 G N], [H]     (I = H * P)
    xBC = silu(causal_conv1d(xBC))                         # conv state: the last K - 1 inputs
    x, B, C = split(xBC)                                   # x [B, T, H, P], B and C [B, T, G, N]
    y = ssd(x, dt, A, B, C, D, dt_bias)                    # SSM state [B, H, P, N]; A = -exp(A_log)
    out = out_proj(rms_norm_gated(y, gate))                # normalized per group of I / G features

Parameters keep the checkpoint's names and layouts under the mixer: in_proj, conv1d ([I + 2 G N, 1, K]), A_log, D,
dt_bias, norm, out_proj. A = -exp(A_log) is computed once, in float32, at load.
"""

from __future__ import annotations

from ...ir import DType, FunctionBuilder
from ..spec import BlockKind, LayerConfig, Mamba2Spec
from . import mixer

B, T = "B", "T"


@mixer(BlockKind.MAMBA2, prefix="mixer")
def mamba2(lo, fname: str, m: Mamba2Spec, cfg: LayerConfig) -> None:
    hidden, inner, heads = lo.spec.hidden_size, m.intermediate_size, m.num_heads
    bc = m.n_groups * m.state_size
    conv = inner + 2 * bc
    b = FunctionBuilder(fname, lo.program)
    x = b.input("x", lo.t(B, T, hidden))
    proj = lo.linear(b, x, "in_proj", inner + conv + heads, hidden, m.use_bias, "proj")
    gate, xbc, dt = b.op("split", proj, sizes=[inner, conv, heads], axis=-1, name=["gate", "xbc", "dt"])
    weight = b.param("conv1d.weight", lo.t(conv, 1, m.conv_kernel))
    bias = b.param("conv1d.bias", lo.t(conv)) if m.use_conv_bias else None
    xbc = b.op("silu", b.op("causal_conv1d", xbc, weight, bias, name="xbc_conv"), name="xbc_act")
    xs, bs, cs = b.op("split", xbc, sizes=[inner, bc, bc], axis=-1, name=["x_flat", "b_flat", "c_flat"])
    xs = b.op("reshape", xs, shape=[B, T, heads, m.head_dim], name="x_heads")
    bs = b.op("reshape", bs, shape=[B, T, m.n_groups, m.state_size], name="b_groups")
    cs = b.op("reshape", cs, shape=[B, T, m.n_groups, m.state_size], name="c_groups")
    a_log = b.param("A_log", lo.t(heads))
    if lo.dtype != DType.F32:  # transformers: A = -exp(A_log.float())
        a_log = b.derive("cast", a_log, dtype=DType.F32, name="A_log_f32")
    a = b.derive("scale", b.derive("exp", a_log, name="A_exp"), factor=-1.0, name="A")
    d = b.param("D", lo.t(heads))
    dt_bias = b.param("dt_bias", lo.t(heads))
    low, high = m.time_step_limit
    y = b.op("ssd", xs, dt, a, bs, cs, d, dt_bias, chunk_size=m.chunk_size, dt_min=low, dt_max=high, name="y")
    y = b.op("reshape", y, shape=[B, T, inner], name="y_flat")
    norm = b.param("norm.weight", lo.t(inner))
    y = b.op("rms_norm_gated", y, gate, norm, eps=cfg.norm.eps, groups=m.n_groups, name="y_normed")
    b.build(lo.linear(b, y, "out_proj", hidden, inner, m.use_bias, "out"))
