"""The Mamba (v1) mixer (`MambaSpec`), as transformers' MambaMixer and JambaMambaMixer compute it:

    x, z = split(in_proj(h))                               # [I] each (I = expand * hidden)
    x = act(causal_conv1d(x))                              # conv state: the last K - 1 inputs
    dt, B, C = split(x_proj(x))                            # [R], [N], [N]; Jamba RMS-normalizes each (bcdt_norm)
    y = selective_scan(x, dt_proj(dt), A, B, C, D, dt_bias=dt_proj.bias, z=z)   # SSM state [I, N]
    out = out_proj(y)

Parameters keep the checkpoint's names and layouts under the mixer: in_proj, conv1d ([I, 1, K]), x_proj, dt_proj,
A_log, D, out_proj (and Jamba's dt_layernorm, b_layernorm, c_layernorm). `dt_proj` is a plain matmul whose bias the
scan adds before its softplus, as transformers does; A = -exp(A_log) is computed once, in float32, at load.
"""

from __future__ import annotations

from ...ir import DType, FunctionBuilder
from ..spec import BlockKind, LayerConfig, MambaSpec, NormConfig, NormType
from . import mixer

B, T = "B", "T"


@mixer(BlockKind.MAMBA, prefix="mixer")
def mamba(lo, fname: str, m: MambaSpec, cfg: LayerConfig) -> None:
    hidden = lo.spec.hidden_size
    inner, n, rank = m.expand * hidden, m.state_size, m.rank(hidden)
    b = FunctionBuilder(fname, lo.program)
    h = b.input("x", lo.t(B, T, hidden))
    xz = lo.linear(b, h, "in_proj", 2 * inner, hidden, m.use_bias, "xz")
    x, z = b.op("split", xz, sizes=[inner, inner], axis=-1, name=["x_in", "z"])
    weight = b.param("conv1d.weight", lo.t(inner, 1, m.conv_kernel))
    bias = b.param("conv1d.bias", lo.t(inner)) if m.use_conv_bias else None
    x = b.op(m.activation.value, b.op("causal_conv1d", x, weight, bias, name="x_conv"), name="x")
    dbc = lo.linear(b, x, "x_proj", rank + 2 * n, inner, False, "dbc")
    dt, bs, cs = b.op("split", dbc, sizes=[rank, n, n], axis=-1, name=["dt_low", "b", "c"])
    if m.bcdt_norm:  # Jamba: an RMSNorm with weights on each, the model's eps
        norm = NormConfig(NormType.RMS, cfg.norm.eps, False)
        dt = lo.norm(b, dt, "dt_layernorm", "dt_normed", norm, rank)
        bs = lo.norm(b, bs, "b_layernorm", "b_normed", norm, n)
        cs = lo.norm(b, cs, "c_layernorm", "c_normed", norm, n)
    delta = lo.linear(b, dt, "dt_proj", inner, rank, False, "delta")
    dt_bias = b.param("dt_proj.bias", lo.t(inner))
    a_log = b.param("A_log", lo.t(inner, n))
    if lo.dtype != DType.F32:  # transformers: A = -exp(A_log.float())
        a_log = b.derive("cast", a_log, dtype=DType.F32, name="A_log_f32")
    a = b.derive("scale", b.derive("exp", a_log, name="A_exp"), factor=-1.0, name="A")
    d = b.param("D", lo.t(inner))
    y = b.op("selective_scan", x, delta, a, bs, cs, d, dt_bias, z, name="y")
    b.build(lo.linear(b, y, "out_proj", hidden, inner, m.use_bias, "out"))
