"""lora and merge-lora: low-rank adapters on chosen projections, and folding them into the base weights.

An adapter on projection P adds `factor * B(A(dropout(x)))` to P's output, with parameters `P.lora_A.weight`
[r, in] and `P.lora_B.weight` [out, r] (PEFT's layout and names) and factor = alpha / r (alpha / sqrt(r) with rsLoRA).
After fusion a projection is a slice of a fused matmul's split; the adapter then adds to that slice, so it keeps its
per-projection meaning. A checkpoint tensor the layout splits (Phi-3's `qkv_proj`, `gate_up_proj`) is a projection
too: targeting it runs its pieces as that one matmul again and the adapter adds to its whole output, as PEFT's
adapter on the fused module does. `merge-lora` rewrites each adapter into a load-time weight update W + factor * B @ A
(re-quantized when W was quantized) and removes it from the forward pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Union

from ..ir import Function, Operation, Program, TensorType, Value
from ..ir.errors import MlxcError
from .base import Pass, PassReport
from .rewrite import Rewriter


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # projection names (`q_proj`, `v_proj`: match the last name segment) or one regex matched against the module's
    # global name (`layers.0.attn.q_proj`) and its last segment, e.g. "q_proj|v_proj" or ".*mlp.*"
    targets: Union[tuple[str, ...], str] = ("q_proj", "v_proj")
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise MlxcError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise MlxcError(f"LoRA alpha must be a finite positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MlxcError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as e:
                raise MlxcError(f"bad LoRA target regex {self.targets!r}: {e}") from None
        elif isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    def to_dict(self) -> dict:
        """Plain data for a manifest: `from_dict` gives back an equal config."""
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": targets,
                "rslora": self.rslora}

    @classmethod
    def from_dict(cls, data: dict) -> "LoRAConfig":
        try:
            return cls(**data)
        except TypeError as e:
            raise MlxcError(f"malformed LoRA configuration {data!r}: {e}") from None

    @property
    def factor(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def selects(self, module: str) -> bool:
        leaf = module.rsplit(".", 1)[-1]
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, module) is not None or re.fullmatch(self.targets, leaf) is not None
        return leaf in self.targets


@dataclass
class Projection:
    """A logical projection in a function body: its module name, input, and the value holding its output."""

    module: str  # e.g. "q_proj" (relative to the function)
    x: Value
    out: Value
    weight: Value  # the checkpoint parameter P.weight (inside a fused concat, if fused)
    after: Operation  # the op producing `out`; adapters are inserted after it


def projections(fn: Function) -> list[Projection]:
    """Every linear's logical projections: itself, or the slices of a fused weight concat split back apart."""
    producer = fn.producers()
    users = fn.users()
    weights = _weights(fn)
    found = []
    for o in fn.ops:
        if o.op != "linear":
            continue
        w = o.operands[1]
        w_op = producer.get(w)
        if w_op is not None and w_op.op == "concat" and all(p in weights for p in w_op.operands):
            split = next((u for u in users.get(o.result, []) if u.op == "split"), None)
            if split is None or len(split.results) != len(w_op.operands):
                continue
            for part, piece in zip(w_op.operands, split.results):
                if part.name.endswith(".weight"):
                    found.append(Projection(part.name[: -len(".weight")], o.operands[0], piece, part, split))
        elif w in weights and w.name.endswith(".weight"):
            found.append(Projection(w.name[: -len(".weight")], o.operands[0], o.result, w, o))
    return found


def _weights(fn: Function) -> set[Value]:
    """Checkpoint weights by role: parameters, and what the checkpoint layout derives from them (a split
    `qkv_proj`, reordered rows) under the parameters' role names."""
    return set(fn.params) | {r for o in fn.derived for r in o.results}


def _module_calls(program: Program, fn: Function, module: str) -> list[str]:
    """The module's global name in every call of `fn` (its weight may be a parameter or derived from one)."""
    return [prefix + module for prefix, f in program.call_paths() if f.name == fn.name]


def _stored_splits(fn: Function) -> list[Operation]:
    """Load-time splits of a checkpoint weight into projection weights along their rows (the checkpoint layout of
    a fused `qkv_proj`)."""
    params = set(fn.params)
    return [o for o in fn.derived if o.op == "split" and o.operands[0] in params and o.attrs["axis"] % 2 == 0
            and o.operands[0].type.rank == 2 and o.operands[0].name.endswith(".weight")
            and all(r.name.endswith(".weight") for r in o.results)]


def _read_stored(fn: Function, rw: Rewriter, split: Operation) -> None:
    """Make one linear read the stored weight that `split` cuts into pieces: the fused matmul that `fuse-qkv` built
    reads it instead of the concatenated pieces, or the pieces' linears of one input become that matmul and a split
    of its output (what fusion would build)."""
    stored, pieces = split.operands[0], split.results
    module = stored.name[: -len(".weight")]
    producer = fn.producers()
    for o in fn.ops:
        cat = producer.get(o.operands[1]) if o.op == "linear" else None
        if cat is not None and cat.op == "concat" and [id(v) for v in cat.operands] == [id(v) for v in pieces] \
                and cat.attrs["axis"] % 2 == 0:
            o.operands[1] = stored
            if not rw.users(cat.result):
                rw.erase(cat)
            return
    readers = [rw.users(p) for p in pieces]
    group = [r[0] for r, p in zip(readers, pieces) if len(r) == 1 and r[0].op == "linear" and r[0].operands[1] is p]
    if len(group) != len(pieces) or len({id(o.operands[0]) for o in group}) != 1 or \
            len({len(o.operands) for o in group}) != 1:
        raise MlxcError(f"@{fn.name}: LoRA target {module}: its pieces "
                        f"({', '.join(p.name for p in pieces)}) are not read as one projection of one input")
    first = min(group, key=fn.ops.index)
    bias = None
    if len(first.operands) == 3:
        bias = rw.insert_before(first, "concat", *[o.operands[2] for o in group], axis=0, name=f"{module}.bias")
    y = rw.insert_before(first, "linear", first.operands[0], stored, bias, name=module.removesuffix("_proj"))
    parts = rw.insert_before(first, "split", y, sizes=[p.type.shape[0] for p in pieces], axis=-1,
                             name=[o.result.name + "_" for o in group])
    for o, part in zip(group, parts):
        rw.replace_uses(o.result, part)
        rw.erase(o)


@dataclass(frozen=True)
class LoRA(Pass):
    """Adapters are graph code like everything else: fusion, codegen and merging treat them uniformly."""

    name = "lora"
    runs_before = ("select-kernels", "quantize")
    order_reason = "finds projections by their checkpoint weights, which those passes move or re-type"
    config: LoRAConfig = field(default_factory=LoRAConfig)

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"adapters": 0})
        cfg = self.config
        available: set[str] = set()
        for fn in program.functions:
            rw = Rewriter(program, fn)
            for split in _stored_splits(fn):
                module = split.operands[0].name[: -len(".weight")]
                available.add(module)
                if not any(cfg.selects(c) for c in _module_calls(program, fn, module)):
                    continue
                both = [r.name[: -len(".weight")] for r in split.results
                        if any(cfg.selects(c) for c in _module_calls(program, fn, r.name[: -len(".weight")]))]
                if both:
                    raise MlxcError(f"LoRA targets select both {module} and its part {both[0]} (the checkpoint "
                                    f"stores them as one tensor); adapt either the whole {module} or its parts")
                _read_stored(fn, rw, split)
            for proj in reversed(projections(fn)):  # reversed: fused slices end up in q, k, v order
                available.add(proj.module.rsplit(".", 1)[-1])
                calls = _module_calls(program, fn, proj.module)
                chosen = [cfg.selects(c) for c in calls]
                if not any(chosen):
                    continue
                if not all(chosen):
                    raise MlxcError(
                        f"LoRA targets select {proj.module} in some layers but not others ({calls[chosen.index(True)]} "
                        f"yes, {calls[chosen.index(False)]} no); per-layer adapters are not supported yet"
                    )
                self._insert(fn, rw, proj)
                report.changes["adapters"] += 1
        if not report.changes["adapters"]:
            wanted = cfg.targets if isinstance(cfg.targets, str) else ", ".join(cfg.targets)
            raise MlxcError(f"LoRA targets ({wanted}) match no projection of this model; its projections are: "
                            f"{', '.join(sorted(available)) or 'none'}")
        return program, report

    def _insert(self, fn: Function, rw: Rewriter, proj: Projection) -> None:
        cfg = self.config
        t = proj.weight.type
        dtype = t.dtype
        a = Value(rw.fresh(f"{proj.module}.lora_A.weight"), TensorType(dtype, (cfg.rank, t.shape[1])))
        b = Value(rw.fresh(f"{proj.module}.lora_B.weight"), TensorType(dtype, (t.shape[0], cfg.rank)))
        fn.params += [a, b]
        users_before = [o for o in fn.ops if any(v is proj.out for v in o.operands)]
        at = fn.ops.index(proj.after) + 1

        def insert(opname: str, *operands: Value, name: str, **attrs) -> Value:
            nonlocal at
            v = rw.insert_at(at, opname, *operands, name=name, **attrs)
            at += 1
            return v

        x = proj.x
        if cfg.dropout > 0:
            x = insert("dropout", x, p=cfg.dropout, name=f"{proj.module}_lora_in")
        down = insert("linear", x, a, name=f"{proj.module}_lora_a")
        up = insert("linear", down, b, name=f"{proj.module}_lora_b")
        delta = insert("scale", up, factor=cfg.factor, name=f"{proj.module}_lora")
        total = insert("add", proj.out, delta, name=f"{proj.module}_out")
        for o in users_before:
            o.operands = [total if v is proj.out else v for v in o.operands]
        fn.outputs = [total if v is proj.out else v for v in fn.outputs]


@dataclass(frozen=True)
class MergeLoRA(Pass):
    """No adapter overhead at inference: W' = W + factor * B @ A, computed once at load time."""

    name = "merge-lora"
    runs_before = ("select-kernels", "quantize")
    order_reason = "folds adapters into checkpoint weights, which those passes re-type"
    requantize: bool = True  # a merged weight whose base was quantized is quantized again (same bits and groups)

    def run(self, program: Program) -> tuple[Program, PassReport]:
        report = PassReport(self.name, {"merged": 0})
        for fn in program.functions:
            rw = Rewriter(program, fn)
            producer = fn.producers()
            for add in [o for o in fn.ops if o.op == "add"]:
                match = _adapter(fn, producer, add)
                if match is None:
                    continue
                base, scale, a, b = match
                weight = _base_weight(fn, producer, base)
                if weight is None:
                    continue
                readers = [o for o in fn.all_ops() if any(v is weight for v in o.operands)]
                merged = self._merged_weight(fn, rw, weight, a, b, scale.attrs["factor"], self.requantize)
                for o in readers:
                    o.operands = [merged if v is weight else v for v in o.operands]
                    if o.op == "concat" and merged.type.quant is None:
                        _float_concat(fn, rw, o)
                rw.replace_uses(add.result, base)
                for dead in _adapter_ops(producer, add):
                    rw.erase(dead)
                report.changes["merged"] += 1
        return program, report

    @staticmethod
    def _merged_weight(fn: Function, rw: Rewriter, w: Value, a: Value, b: Value, factor: float,
                       requantize: bool) -> Value:
        """Load-time ops computing the merged weight, placed early in the derive section: derived values such as a
        fused weight's concat read their result."""
        stem = w.name[: -len(".weight")] if w.name.endswith(".weight") else w.name
        # right after w's own definition when w is derived (e.g. already dequantized), else first
        slot = next((i + 1 for i, o in enumerate(fn.derived) if any(r is w for r in o.results)), 0)

        def derive(opname: str, *operands: Value, name: str, **attrs) -> Value:
            nonlocal slot
            v = rw.derive(slot, opname, *operands, name=name, **attrs)
            slot += 1
            return v

        base = derive("dequantize", w, name=f"{stem}_f.weight") if w.type.quant else w
        a_t = derive("transpose", a, perm=[1, 0], name=f"{stem}.lora_At")
        ba = derive("linear", b, a_t, name=f"{stem}.lora_BA")
        delta = derive("scale", ba, factor=factor, name=f"{stem}.lora_delta")
        merged = derive("add", base, delta, name=f"{stem}_merged.weight")
        # re-quantized only where that gives back the stored type: MLX's quantize writes scales in the weight's
        # dtype, so a GGUF weight's float16 scales (q4g32_f16) would come back as another type, which its fused
        # siblings cannot be concatenated with; such a merged weight stays float (exact)
        if w.type.quant and requantize and w.type.quant.scales is None:
            q = w.type.quant
            merged = derive("quantize", merged, bits=q.bits, group_size=q.group_size, name=f"{stem}_merged_q.weight")
        return merged


def _float_concat(fn: Function, rw: Rewriter, cat: Operation) -> None:
    """A fused weight whose merged slice stayed float: its other slices are dequantized at load too, so the
    concatenation (and the one matmul reading it) is in float."""
    def dequantized(v: Value) -> Value:
        # a load-time op after everything its operand may be derived from: just before a derived concat, or at the
        # end of the derive section for a concat in the body (which reads every derived value)
        at = fn.derived.index(cat) if cat in fn.derived else len(fn.derived)
        return rw.derive(at, "dequantize", v, name=f"{v.name}_f")

    cat.operands = [v if v.type.quant is None else dequantized(v) for v in cat.operands]
    for r in cat.results:
        r.type = r.type.with_quant(None)


def _adapter(fn: Function, producer: dict, add: Operation):
    """add(base, scale(linear(linear(x, A), B))) with A/B adapter parameters -> (base, scale op, A, B)."""
    base, delta = add.operands
    s = producer.get(delta)
    if s is None or s.op != "scale":
        return None
    up = producer.get(s.operands[0])
    if up is None or up.op != "linear" or not up.operands[1].name.endswith("lora_B.weight"):
        return None
    down = producer.get(up.operands[0])
    if down is None or down.op != "linear" or not down.operands[1].name.endswith("lora_A.weight"):
        return None
    return base, s, down.operands[1], up.operands[1]


def _adapter_ops(producer: dict, add: Operation) -> list[Operation]:
    s = producer[add.operands[1]]
    up = producer[s.operands[0]]
    down = producer[up.operands[0]]
    ops = [add, s, up, down]
    d = producer.get(down.operands[0])
    if d is not None and d.op == "dropout":
        ops.append(d)
    return ops


def _base_weight(fn: Function, producer: dict, out: Value) -> Value | None:
    """The checkpoint weight whose matmul produced `out`: a linear's weight, or its slice of a fused concat."""
    op = producer.get(out)
    if op is not None and op.op == "linear" and op.operands[1] in _weights(fn):
        producer_of_weight = producer.get(op.operands[1])
        if producer_of_weight is None or producer_of_weight.op != "concat":
            return op.operands[1]
    if op is not None and op.op == "split":
        lin = producer.get(op.operands[0])
        cat = producer.get(lin.operands[1]) if lin is not None and lin.op == "linear" else None
        if cat is not None and cat.op == "concat" and len(cat.operands) == len(op.results):
            return cat.operands[op.results.index(out)]
    return None
