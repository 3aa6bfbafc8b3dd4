"""fuse-qkv and fuse-gate-up: parallel projections of one input become one matmul and a split.

Both are the same rewrite with different roles: linears whose weights are `<role>.weight` of the same function and
read the same input become `split(linear(x, concat(W...)), sizes)`. The weight concat is ordinary graph code here;
`lift-params` moves it to load time, so the artifact stores the fused weight once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Kernel, Operation, Program
from ..ir.ops import ACTIVATIONS
from .base import Pass, PassReport
from .rewrite import Rewriter, apply_patterns


def _role(op: Operation) -> str | None:
    """`q_proj` for a linear whose weight is the value `q_proj.weight`."""
    if op.op != "linear":
        return None
    parts = op.operands[1].name.rsplit(".", 1)
    return parts[0] if len(parts) == 2 and parts[1] == "weight" else None


@dataclass(frozen=True)
class CombineParallelLinears:
    roles: tuple[str, ...]  # e.g. ("q_proj", "k_proj", "v_proj"), in output order
    fused: str  # the fused projection's name, e.g. "qkv_proj"

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        if _role(op) != self.roles[0]:
            return False
        x = op.operands[0]
        found = {}
        for o in rw.fn.ops:
            if o.op == "linear" and o.operands[0] is x and _role(o) in self.roles:
                found.setdefault(_role(o), o)
        if len(found) != len(self.roles):
            return False
        group = [found[r] for r in self.roles]
        weights = [o.operands[1] for o in group]
        if len({(w.type.dtype, w.type.quant, w.type.shape[1]) for w in weights}) != 1:
            return False  # back off: the weights cannot be stacked into one matrix
        with_bias = [len(o.operands) == 3 for o in group]
        if any(with_bias) and not all(with_bias):
            return False
        first = min(group, key=rw.fn.ops.index)
        later = {id(r) for o in rw.fn.ops[rw.fn.ops.index(first):] for r in o.results}
        if any(id(v) in later for o in group for v in o.operands[1:]):
            return False  # back off: a weight or bias is computed in the body after the first projection
        w = rw.insert_before(first, "concat", *weights, axis=0, name=f"{self.fused}.weight")
        b = rw.insert_before(first, "concat", *[o.operands[2] for o in group], axis=0,
                             name=f"{self.fused}.bias") if all(with_bias) else None
        y = rw.insert_before(first, "linear", x, w, b, name=self.fused.removesuffix("_proj"))
        sizes = [wt.type.shape[0] for wt in weights]
        parts = rw.insert_before(first, "split", y, sizes=sizes, axis=-1, name=[o.result.name + "_" for o in group])
        for o, part in zip(group, parts):
            rw.replace_uses(o.result, part)
            rw.erase(o)
        return True


@dataclass(frozen=True)
class FuseQKV(Pass):
    """One matmul instead of three per attention layer: fewer ops per decode step, one larger GEMM in prefill."""

    name = "fuse-qkv"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        n = apply_patterns(program, [CombineParallelLinears(("q_proj", "k_proj", "v_proj"), "qkv_proj")])
        return program, PassReport(self.name, {"fused": n})


@dataclass(frozen=True)
class FuseGateUp(Pass):
    """Gate and up projections of a gated MLP read the same input: one matmul, then split before the activation."""

    name = "fuse-gate-up"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        n = apply_patterns(program, [CombineParallelLinears(("gate_proj", "up_proj"), "gate_up_proj")])
        return program, PassReport(self.name, {"fused": n})


# ------------------------------------------------------------------------------- one kernel for several ops
# After fuse-qkv and fuse-gate-up, the glue between two projections is a chain of shape ops and elementwise ops. On a
# target whose kernels take the whole chain (the native CPU kernels: select-kernels applies these there), each chain
# becomes one fused op (ir/ops.py: `glu`, `qkv_attention`); a decode step then dispatches a third of the ops.


def _sole_use(rw: Rewriter, v, op: Operation) -> bool:
    """Whether `op` is the only reader of `v` (nothing else, not the function's outputs, sees it)."""
    return all(v is not x for x in rw.fn.outputs) and rw.users(v) == [op]


def _producer(rw: Rewriter, v) -> Operation | None:
    return next((o for o in rw.fn.ops if any(r is v for r in o.results)), None)


def _last_axis(o: Operation) -> bool:
    return o.attrs["axis"] in (-1, o.operands[0].type.rank - 1)


@dataclass(frozen=True)
class GatedUnit:
    """split(y, [n, n]) -> act(gate) * up  ==>  glu(y, activation = act)."""

    kernel: Kernel = Kernel.REFERENCE  # the new op's implementation

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        if op.op != "split" or len(op.results) != 2 or not _last_axis(op):
            return False
        gate, up = op.results
        if gate.type.shape[-1] != up.type.shape[-1]:
            return False
        users = rw.users(gate)
        if len(users) != 1 or users[0].op not in ACTIVATIONS or not _sole_use(rw, gate, users[0]):
            return False
        act = users[0]
        mul = rw.users(act.result)
        if len(mul) != 1 or mul[0].op != "mul" or not _sole_use(rw, act.result, mul[0]) \
                or not _sole_use(rw, up, mul[0]) or {id(v) for v in mul[0].operands} != {id(act.result), id(up)}:
            return False
        at, product = rw.fn.ops.index(op), mul[0].result
        for o in (mul[0], act, op):
            rw.erase(o)
        y = rw.insert_at(at, "glu", op.operands[0], activation=act.op, kernel=self.kernel, name=product.name)
        rw.replace_uses(product, y)
        return True


_HEADS_PERM = [0, 2, 1, 3]


@dataclass(frozen=True)
class AttentionFromQKV:
    """split(qkv) -> per part reshape to heads, transpose, rope (q and k) -> attention -> transpose, reshape
    ==>  qkv_attention(qkv, offset). Only where every intermediate has no other reader, the rotation is one
    fixed-frequency rope on both, and the attention takes no ALiBi bias."""

    ROPE_KINDS = ("default", "linear", "llama3")  # fixed frequencies, unit magnitude: what the fused kernels take

    def match_and_rewrite(self, op: Operation, rw: Rewriter) -> bool:
        if op.op != "attention" or op.attrs.get("alibi") is not None \
                or op.attrs["kernel"] not in (Kernel.REFERENCE, Kernel.NATIVE):
            return False
        chain = []  # the ops replaced, in order
        q, k, v = op.operands
        ropes = [_producer(rw, q), _producer(rw, k)]
        if any(r is None or r.op != "rope" or not _sole_use(rw, r.result, op) for r in ropes):
            return False
        rq, rk = ropes
        rope_attrs = ("dims", "base", "scaling", "traditional")
        if any(rq.attrs[a] != rk.attrs[a] for a in rope_attrs) or rq.operands[1] is not rk.operands[1] \
                or rq.attrs["scaling"].kind.value not in self.ROPE_KINDS:
            return False
        parts, heads = [], []
        for head_value, user in ((rq.operands[0], rq), (rk.operands[0], rk), (v, op)):
            t = _producer(rw, head_value)
            if t is None or t.op != "transpose" or list(t.attrs["perm"]) != _HEADS_PERM \
                    or not _sole_use(rw, t.result, user):
                return False
            r = _producer(rw, t.operands[0])
            if r is None or r.op != "reshape" or not _sole_use(rw, r.result, t) or r.result.type.rank != 4 \
                    or r.result.type.shape[:2] != r.operands[0].type.shape[:2]:  # [B, T, heads, head_dim]
                return False
            parts.append(r.operands[0])
            heads.append(r.result.type.shape[2:])
            chain += [r, t]
        split = _producer(rw, parts[0])
        if split is None or split.op != "split" or len(split.results) != 3 or not _last_axis(split) \
                or any(a is not b for a, b in zip(split.results, parts)) \
                or any(not _sole_use(rw, p, u) for p, u in zip(parts, chain[0::2])):
            return False
        (hq, dq), (hk, dk), (hv, dv) = heads
        if not (dq == dk == dv and hk == hv) or not all(isinstance(d, int) for d in (hq, hk, dq)):
            return False
        users = rw.users(op.result)
        if len(users) != 1 or users[0].op != "transpose" or list(users[0].attrs["perm"]) != _HEADS_PERM \
                or not _sole_use(rw, op.result, users[0]):
            return False
        merge_t = users[0]
        merged = rw.users(merge_t.result)
        if len(merged) != 1 or merged[0].op != "reshape" or not _sole_use(rw, merge_t.result, merged[0]) \
                or merged[0].result.type.shape != split.operands[0].type.shape[:2] + (hq * dq,):
            return False
        at, merged, offset = rw.fn.ops.index(split), merged[0], rq.operands[1]
        source = _producer(rw, offset)
        if source is not None and rw.fn.ops.index(source) > at:
            return False  # the offset is computed after the split: the fused op cannot take the split's place
        for o in [merged, merge_t, op, rq, rk, *chain, split]:
            rw.erase(o)
        out = rw.insert_at(at, "qkv_attention", split.operands[0], offset, heads=hq, kv_heads=hk,
                           head_dim=dq, scale=op.attrs["scale"], window=op.attrs["window"],
                           softcap=op.attrs["softcap"], kernel=op.attrs["kernel"], name=op.result.name,
                           **{a: rq.attrs[a] for a in rope_attrs})
        rw.replace_uses(merged.result, out)
        return True


@dataclass(frozen=True)
class FuseGLU(Pass):
    """A gated MLP's split, activation and product as one `glu` op."""

    name = "fuse-glu"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        return program, PassReport(self.name, {"fused": apply_patterns(program, [GatedUnit()])})


@dataclass(frozen=True)
class FuseAttention(Pass):
    """Head split, rotary embedding, attention and head merge after a fused QKV projection as one `qkv_attention`."""

    name = "fuse-attention"

    def run(self, program: Program) -> tuple[Program, PassReport]:
        return program, PassReport(self.name, {"fused": apply_patterns(program, [AttentionFromQKV()])})
