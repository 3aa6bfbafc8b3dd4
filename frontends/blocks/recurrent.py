"""Recurrent mixers: LSTM, GRU and minGRU layers over the layer's normalized input (`RecurrentSpec`).

The input's share of every gate is a `linear` over all positions at once, so it is fused, quantized and adapted
(LoRA) like any projection; only what depends on the previous step is the recurrent op. Parameters keep torch's
layouts, so an `nn.LSTM` / `nn.GRU` copies over tensor for tensor:

    in_proj.weight  = weight_ih_l0 [4H | 3H, I]      hh.weight = weight_hh_l0 [4H | 3H, H]
    in_proj.bias    = bias_ih_l0                     hh.bias   = bias_hh_l0

minGRU has the paper's two projections, `z_proj` (linear_z) and `h_proj` (linear_h). When the cell's size H differs
from the model's hidden size (or `out_proj: true`), `out_proj` [hidden, H] maps the cell's output back.
"""

from __future__ import annotations

from ...ir import FunctionBuilder
from ..spec import BlockKind, RecurrentSpec
from . import mixer

_GATES = {BlockKind.LSTM: 4, BlockKind.GRU: 3}


def _build(lo, fname: str, s: RecurrentSpec, kind: BlockKind) -> None:
    hidden = lo.spec.hidden_size
    size = s.hidden_size or hidden
    b = FunctionBuilder(fname, lo.program)
    x = b.input("x", lo.t("B", "T", hidden))
    if kind == BlockKind.MINGRU:
        z = lo.linear(b, x, "z_proj", size, hidden, s.bias, "z")
        candidate = lo.linear(b, x, "h_proj", size, hidden, s.bias, "h_tilde")
        h = b.op("mingru", z, candidate, name="h")
    else:
        n = _GATES[kind]
        gates = lo.linear(b, x, "in_proj", n * size, hidden, s.bias, "gates")
        weight = b.param("hh.weight", lo.t(n * size, size))
        bias = b.param("hh.bias", lo.t(n * size)) if s.bias else None
        h = b.op(kind.value, gates, weight, bias, name="h")
    if s.out_proj or (s.out_proj is None and size != hidden):
        h = lo.linear(b, h, "out_proj", hidden, size, s.out_bias, "out")
    b.build(h)


@mixer(BlockKind.LSTM, prefix="rnn")
def lstm(lo, fname: str, settings: RecurrentSpec, cfg) -> None:
    _build(lo, fname, settings, BlockKind.LSTM)


@mixer(BlockKind.GRU, prefix="rnn")
def gru(lo, fname: str, settings: RecurrentSpec, cfg) -> None:
    _build(lo, fname, settings, BlockKind.GRU)


@mixer(BlockKind.MINGRU, prefix="rnn")
def mingru(lo, fname: str, settings: RecurrentSpec, cfg) -> None:
    _build(lo, fname, settings, BlockKind.MINGRU)
