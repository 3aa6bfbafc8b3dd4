"""shard: one rank's share of a program, for tensor or pipeline parallelism over `mx.distributed`.

`Shard(ranks=N, rank=r)` (tensor parallelism, Megatron-LM's split) gives every rank about 1/N of each layer's
weights and KV cache; ranks meet twice per layer:

- attention: a rank keeps whole heads, query heads in contiguous groups, each with the key/value heads it reads
  (a KV head is replicated on several ranks when there are fewer KV heads than ranks). Q/K/V projections, fused or
  not, keep those heads' rows; the output projection keeps the matching columns and its partial products are added
  up by an `all_sum` (its bias is added once, after);
- feed-forward: gate/up keep rows and down the matching columns of a share of the intermediate size (`all_sum`
  after down); a mixture of experts divides its experts (expert parallelism: every rank routes every token, runs
  its own experts, an `all_sum` adds the shares);
- the embedding and the LM head are divided by vocabulary rows: `embed_range` + `all_sum`, and the head's logits
  joined by an `all_gather`, so every rank ends with the whole logits.

`Shard(ranks=N, rank=r, mode="pipeline")` gives rank r a consecutive range of layers instead: rank 0 embeds, stage
r `send`s its last hidden state to r + 1 (MLX's ring connects only neighbours, so stages go in rank order), the
last stage's hidden state is `broadcast`, and the LM head is divided by vocabulary as above.

A share of a weight is a load-time `slice` of the checkpoint tensor, pushed through the layout ops that derive
weights from checkpoint tensors (concats, splits, stacks, row reorders), so the loader reads only those rows or
columns (`loading_program`). Splits may be uneven wherever the math allows (heads, intermediate sizes,
vocabularies, experts, layers); where it does not, a `ShardError` says why.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from math import lcm
from typing import Sequence

from ..ir import Function, OpGroup, Operation, Program, Value, verify
from ..ir.errors import MlxcError
from ..ir.opdef import Floats, Shape
from .base import Pass, PassReport
from .dce import DeadCodeElimination
from .rewrite import Rewriter, refresh_types

MODES = ("tensor", "pipeline")
Ranges = tuple[tuple[int, int], ...]
_LAYER = re.compile(r"([A-Za-z_]\w*)\.(\d+)")


class ShardError(MlxcError):
    pass


# ------------------------------------------------------------------------------------------------ who gets what


def shares(n: int, ranks: int, unit: int = 1, what: str = "entries") -> list[tuple[int, int]]:
    """Each rank's [start, stop) of n entries, in multiples of `unit`, as even as possible (earlier ranks take the
    extra units)."""
    if n % unit:
        raise ShardError(f"{n} {what} do not split into blocks of {unit}")
    units = n // unit
    if units < ranks:
        raise ShardError(f"{n} {what} cannot be shared by {ranks} ranks" +
                         (f" in blocks of {unit}" if unit > 1 else "") + ": every rank needs at least one")
    base, extra = divmod(units, ranks)
    out, start = [], 0
    for r in range(ranks):
        stop = start + (base + (r < extra)) * unit
        out.append((start, stop))
        start = stop
    return out


def head_shares(num_heads: int, num_kv_heads: int, ranks: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Each rank's (query heads, KV heads) ranges. A rank takes whole groups (the query heads that read one KV head)
    while there are at least as many KV heads as ranks; with fewer, each KV head is replicated on ranks / KV-heads
    ranks, which share its group's query heads."""
    if num_heads % num_kv_heads:
        raise ShardError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= ranks:
        return [((a * group, b * group), (a, b)) for a, b in shares(num_kv_heads, ranks, what="KV heads")]
    if ranks % num_kv_heads:
        raise ShardError(f"{ranks} ranks cannot divide {num_kv_heads} KV heads: with fewer KV heads than ranks each "
                         f"KV head is replicated on the ranks sharing its query heads, so the rank count must be a "
                         f"multiple of {num_kv_heads} (or at most {num_kv_heads})")
    per = ranks // num_kv_heads
    if group < per:
        raise ShardError(f"{num_heads} query heads cannot be split over {ranks} ranks: each rank needs at least one")
    return [((h * group + a, h * group + b), (h, h + 1)) for h in range(num_kv_heads)
            for a, b in shares(group, per, what="query heads")]


def stages(num_layers: int, ranks: int) -> list[tuple[int, int]]:
    """Each pipeline stage's [first, stop) layers; later stages take the extra layers (stage 0 also embeds)."""
    if num_layers < ranks:
        raise ShardError(f"a pipeline over {ranks} ranks needs at least {ranks} layers; the model has {num_layers}")
    base, extra = divmod(num_layers, ranks)
    out, start = [], 0
    for r in range(ranks):
        stop = start + base + (r >= ranks - extra)
        out.append((start, stop))
        start = stop
    return out


def _total(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def _shift(ranges: Ranges, by: int) -> Ranges:
    return tuple((a + by, b + by) for a, b in ranges)


# ------------------------------------------------------------------------------------------------ the pass


@dataclass(frozen=True)
class Shard(Pass):
    """Valid IR in, one rank's valid IR out: shares of the weights as load-time slices, communication as collective
    ops with effects (never merged, lifted or dropped)."""

    name = "shard"
    ranks: int = 1
    rank: int = 0
    mode: str = "tensor"
    align: int = 1  # column shares of row-parallel weights start on multiples of this (a quantization group)

    def run(self, program: Program) -> tuple[Program, PassReport]:
        if self.mode not in MODES:
            raise ShardError(f"unknown parallelism {self.mode!r}; expected one of {', '.join(MODES)}")
        if not (isinstance(self.ranks, int) and self.ranks >= 1 and 0 <= self.rank < self.ranks):
            raise ShardError(f"rank {self.rank} is not one of {self.ranks} ranks")
        report = PassReport(self.name, {"all_sum": 0, "all_gather": 0, "sliced weights": 0, "replicated": 0})
        if self.ranks == 1:
            return program, report
        vocab = next((o.operands[1].type.shape[0] for o in program.main.ops if o.op == "embed"), None)
        main = _Function(self, program, program.main, report)
        if self.mode == "tensor":
            for fn in program.functions:
                if fn.name != Program.ENTRY:
                    _Function(self, program, fn, report).tensor()
            main.embeddings()
        else:
            main.pipeline()
        if vocab is not None:
            main.lm_head(vocab)
        for fn in program.functions:
            _sort_derived(fn)
            refresh_types(program, fn)
        program, _ = DeadCodeElimination().run(program)
        return program, report


def place(passes: Sequence[Pass], shard: Shard) -> list[Pass]:
    """`shard` in a pipeline: after fusion (fused projections split by segment), before weight work is lifted,
    quantized or adapted, so every later pass sees a rank's weights."""
    items = list(passes)
    fused = [i for i, p in enumerate(items) if p.name.startswith("fuse-")]
    first = 0 if not fused else fused[-1] + 1
    late = ("lift-params", "lora", "merge-lora", "quantize", "select-kernels", "cse", "fold-shapes")
    at = next((i for i, p in enumerate(items) if i >= first and p.name in late), len(items))
    # the layout and storage passes make the checkpoint's tensors the parameters: shard must come after them
    at = max(at, max((i + 1 for i, p in enumerate(items) if p.name in ("checkpoint-layout", "storage-types")),
                     default=0))
    return items[:at] + [shard] + items[at:]


class _Function:
    """The rewrites of one function for one rank."""

    def __init__(self, shard: Shard, program: Program, fn: Function, report: PassReport):
        self.s, self.program, self.fn, self.report = shard, program, fn, report
        self.rw = Rewriter(program, fn)
        self.taken: dict[tuple, Value] = {}  # (value, axis, ranges) -> its share, made once
        self.done: set[int] = set()  # ops already rewritten or accounted for

    def error(self, msg: str) -> ShardError:
        return ShardError(f"cannot split @{self.fn.name} over {self.s.ranks} ranks: {msg}")

    def producer(self, v: Value) -> Operation | None:
        for o in self.fn.all_ops():
            if any(r is v for r in o.results):
                return o
        return None

    def users(self, v: Value) -> list[Operation]:
        return [o for o in self.fn.all_ops() if any(x is v for x in o.operands)]

    # -------------------------------------------------------------------------------- tensor parallelism

    def tensor(self) -> None:
        fn = self.fn
        for o in fn.ops:
            if o.opdef.state is not None and o.op != "attention":
                raise self.error(f"its {o.op} op keeps a state that tensor parallelism does not divide yet; "
                                 "use --parallel pipeline")
        for o in [o for o in fn.ops if o.op == "attention"]:
            self.attention(o)
        for o in [o for o in fn.ops if o.op == "moe"]:
            self.experts(o)
        for o in list(fn.ops):
            if o.op == "linear" and id(o) not in self.done and o.operands[0] not in fn.inputs:
                self.feed_forward(o)

    def attention(self, op: Operation) -> None:
        """Whole heads per rank: Q/K/V rows (through fused splits), the head reshapes, the output projection's
        columns and an all_sum."""
        q, k, v = op.operands
        nq, nkv = q.type.shape[1], k.type.shape[1]
        d, dv = q.type.shape[3], v.type.shape[3]
        try:
            (q0, q1), (k0, k1) = head_shares(nq, nkv, self.s.ranks)[self.s.rank]
        except ShardError as err:
            raise self.error(str(err)) from None
        if op.attrs.get("alibi") is not None:  # ALiBi: this rank's heads keep their slopes
            op.attrs["alibi"] = Floats(op.attrs["alibi"][q0:q1])
        narrow = _Narrow(self)
        for value, (a, b), width in ((q, (q0, q1), d), (k, (k0, k1), d), (v, (k0, k1), dv)):
            reshape = self._heads(value)
            shape = list(reshape.attrs["shape"])
            shape[2] = b - a
            reshape.attrs["shape"] = Shape(shape)
            narrow.want(reshape.operands[0], ((a * width, b * width),), sink=reshape)
        narrow.apply()
        flat = self._flat(op.result)
        shape = list(flat.attrs["shape"])
        shape[-1] = (q1 - q0) * dv
        flat.attrs["shape"] = Shape(shape)
        out = [u for u in self.users(flat.result) if u.op == "linear" and u.operands[0] is flat.result]
        if len(out) != 1 or len(self.users(flat.result)) != 1:
            raise self.error("the attention output does not feed one output projection")
        self.row_parallel(out[0], ((q0 * dv, q1 * dv),))

    _PER_HEAD = ("rope", "transpose", "rms_norm", "layer_norm", "cast", "clip")

    def _heads(self, value: Value) -> Operation:
        """The reshape that cut an attention operand into heads, walking back through per-head ops."""
        while True:
            p = self.producer(value)
            if p is None:
                raise self.error(f"%{value.name} does not come from a projection reshaped into heads")
            if p.op == "reshape":
                if p.result.type.rank != 4:
                    raise self.error(f"%{value.name}: unexpected reshape to {p.result.type}")
                return p
            if p.op not in self._PER_HEAD or (p.op in ("rms_norm", "layer_norm") and p.operands[0].type.rank != 4):
                raise self.error(f"%{value.name} comes from {p.op}, which does not keep heads apart")
            value = p.operands[0]

    def _flat(self, value: Value) -> Operation:
        """The reshape that joins the attention output's heads again (after its transpose)."""
        for _ in range(2):
            users = self.users(value)
            if len(users) != 1:
                break
            if users[0].op == "reshape":
                return users[0]
            if users[0].op != "transpose":
                break
            value = users[0].result
        raise self.error("the attention output is not transposed and reshaped into one projection's input")

    def experts(self, op: Operation) -> None:
        """Expert parallelism: this rank's experts, routing over all of them, then an all_sum."""
        x, logits, gate, up, down = op.operands
        e = gate.type.shape[0]
        try:
            a, b = shares(e, self.s.ranks, what="experts")[self.s.rank]
        except ShardError as err:
            raise self.error(str(err)) from None
        weights = [self.take(w, 0, ((a, b),)) for w in (gate, up, down)]
        attrs = dict(op.attrs, first_expert=a + (op.attrs.get("first_expert") or 0))
        part = self.rw.insert_before(op, "moe", x, logits, *weights, name=op.result.name + "_part", **attrs)
        self.done.add(id(self.producer(part)))
        self._sum(op, part)

    def feed_forward(self, op: Operation) -> None:
        """A matmul whose input is made from matmuls of the function's input (down_proj after gate/up and the
        activation): a share of that input's features, column-parallel before, row-parallel here."""
        n = op.operands[1].type.shape[1]
        unit = lcm(self.s.align, *[q.group_size for q in (op.operands[1].type.quant,) if q is not None])
        try:
            cols = (shares(n, self.s.ranks, unit, what="features")[self.s.rank],)
        except ShardError:
            self.report.changes["replicated"] += 1
            return
        narrow = _Narrow(self)
        narrow.want(op.operands[0], cols, sink=op)
        if narrow.feasible() is not None:
            self.report.changes["replicated"] += 1  # not a column-parallel chain: every rank computes it whole
            return
        narrow.apply()
        self.row_parallel(op, cols)

    def row_parallel(self, op: Operation, cols: Ranges) -> None:
        """linear(x_share, W[:, cols]) summed over the ranks, then the bias once."""
        x, w = op.operands[0], op.operands[1]
        bias = op.operands[2] if len(op.operands) > 2 else None
        # its input's type changes only when the function's types are refreshed: the (whole) output type is known
        part = Operation("linear", [x, self.take(w, 1, cols)], dict(op.attrs),
                         [Value(self.rw.fresh(op.result.name + "_part"), op.result.type)])
        self.fn.ops.insert(self.fn.ops.index(op), part)
        self.done.add(id(part))
        self._sum(op, part.result, bias)

    def _sum(self, op: Operation, part: Value, bias: Value | None = None) -> None:
        """Replace op's result by the all_sum of this rank's `part` (plus `bias`), under op's result name."""
        total = self.rw.insert_before(op, "all_sum", part, name=op.result.name + "_sum")
        if bias is not None:
            total = self.rw.insert_before(op, "add", total, bias, name=op.result.name + "_biased")
        old = op.result.name
        self.rw.replace_uses(op.result, total)
        self.rw.erase(op)
        total.name = old
        self.done.add(id(op))
        self.report.changes["all_sum"] += 1

    # -------------------------------------------------------------------------------- @main

    def embeddings(self) -> None:
        """Vocabulary-parallel lookups: this rank's rows, zeros for other ids, an all_sum."""
        for op in [o for o in self.fn.ops if o.op == "embed"]:
            ids, table = op.operands
            a, b = self._vocab(table.type.shape[0])[self.s.rank]
            part = self.rw.insert_before(op, "embed_range", ids, self.take(table, 0, ((a, b),)),
                                         name=op.result.name + "_part", first=a)
            self._sum(op, part)

    def lm_head(self, vocab: int) -> None:
        """The causal LM head (rows: the vocabulary) divided by vocabulary rows; all_gather joins the logits."""
        for op in [o for o in self.fn.ops if o.op == "linear"]:
            w = op.operands[1]
            if w.type.shape[0] != vocab or not self._reaches_output(op.result):
                continue
            sizes = [b - a for a, b in self._vocab(vocab)]
            a, b = self._vocab(vocab)[self.s.rank]
            bias = op.operands[2] if len(op.operands) > 2 else None
            bias = self.take(bias, 0, ((a, b),)) if bias is not None else None
            part = self.rw.insert_before(op, "linear", op.operands[0], self.take(w, 0, ((a, b),)), bias,
                                         name=op.result.name + "_part", **op.attrs)
            whole = self.rw.insert_before(op, "all_gather", part, sizes=sizes, axis=-1, name=op.result.name + "_all")
            old = op.result.name
            self.rw.replace_uses(op.result, whole)
            self.rw.erase(op)
            whole.name = old
            self.report.changes["all_gather"] += 1

    def _vocab(self, n: int) -> list[tuple[int, int]]:
        try:
            return shares(n, self.s.ranks, what="vocabulary rows")
        except ShardError as err:
            raise self.error(str(err)) from None

    def _reaches_output(self, v: Value) -> bool:
        """Whether v is returned, directly or through elementwise ops (a soft-cap): the head, not a classifier."""
        while not any(v is out for out in self.fn.outputs):
            users = self.users(v)
            if len(users) != 1 or users[0].opdef.group != OpGroup.UNARY:
                return False
            v = users[0].result
        return True

    def pipeline(self) -> None:
        """This rank's stage of consecutive layer calls, with the activations passed on by send/recv and the last
        stage's broadcast to all (the LM head that follows is divided by vocabulary)."""
        fn, rank, ranks = self.fn, self.s.rank, self.s.ranks
        calls = [o for o in fn.ops if o.op == "call" and _LAYER.fullmatch(o.attrs["prefix"])]
        if not calls:
            raise self.error("@main calls no layers (`layers.<i>`) to divide into stages")
        first, last = fn.ops.index(calls[0]), fn.ops.index(calls[-1])
        if fn.ops[first:last + 1] != calls or any(c.operands[0] is not p.result for p, c in zip(calls, calls[1:])):
            raise self.error("the layers are not one chain of consecutive calls")
        try:
            a, b = stages(len(calls), ranks)[rank]
        except ShardError as err:
            raise self.error(str(err)) from None
        before, after = fn.ops[:first], fn.ops[last + 1:]
        h = calls[0].operands[0]
        ops = list(before) if rank == 0 else []
        if rank > 0:
            recv = self.rw.make("recv", [fn.inputs[0]], "h_recv", dict(src=rank - 1, shape=Shape(h.type.shape),
                                                                     dtype=h.type.dtype))
            ops.append(recv)
            h = recv.result
        for c in calls[a:b]:
            c.operands[0] = h
            ops.append(c)
            h = c.result
        if rank < ranks - 1:
            send = self.rw.make("send", [h], "h_sent", dict(dst=rank + 1))
            ops.append(send)
            h = send.result
        last_h = self.rw.make("broadcast", [h], "h_last", dict(root=ranks - 1))
        ops.append(last_h)
        inner = {id(c.result) for c in calls[:-1]}
        if any(id(v) in inner for o in after for v in o.operands) or any(id(v) in inner for v in fn.outputs):
            raise self.error("a layer's output other than the last is read after the layers (--passes "
                             "expose-hidden?); a pipeline passes on only the last")
        for o in after:
            o.operands = [last_h.result if v is calls[-1].result else v for v in o.operands]
        fn.outputs = [last_h.result if v is calls[-1].result else v for v in fn.outputs]
        fn.ops = ops + after

    # -------------------------------------------------------------------------------- weight shares

    def take(self, w: Value, axis: int, ranges: Ranges) -> Value:
        """Entries `ranges` of weight w along `axis`, as load-time ops that read the checkpoint tensors only there."""
        axis %= w.type.rank
        n = w.type.shape[axis]
        if ranges == ((0, n),):
            return w
        q = w.type.quant
        if q is not None and axis == w.type.rank - 1 and any(a % q.group_size or b % q.group_size for a, b in ranges):
            cols = ", ".join(f"{a}..{b - 1}" for a, b in ranges)
            raise self.error(f"this rank's columns {cols} of %{w.name} cut through its quantization groups of "
                             f"{q.group_size} (whole heads or experts do not line up with them); use fewer ranks or "
                             "--parallel pipeline")
        key = (id(w), axis, ranges)
        if key not in self.taken:
            self.taken[key] = self._take(w, axis, ranges)
        return self.taken[key]

    def _take(self, w: Value, axis: int, ranges: Ranges) -> Value:
        p = self.producer(w)
        name = _share_name(w.name)
        if p is None:  # a checkpoint tensor: the loader reads these slices
            parts = [self._derive("slice", [w], name, axis=axis, start=a, stop=b) for a, b in ranges]
            self.report.changes["sliced weights"] += 1
            return parts[0] if len(parts) == 1 else self._derive("concat", parts, name, axis=axis)
        rank = w.type.rank
        if p.op == "concat":
            cax = p.attrs["axis"] % rank
            if cax != axis:
                return self._derive("concat", [self.take(x, axis, ranges) for x in p.operands], name, axis=cax)
            parts, offset = [], 0
            for x in p.operands:
                size = x.type.shape[axis]
                mine = tuple((max(a, offset) - offset, min(b, offset + size) - offset) for a, b in ranges
                             if a < offset + size and b > offset)
                if mine:
                    parts.append(self.take(x, axis, mine))
                offset += size
            return parts[0] if len(parts) == 1 else self._derive("concat", parts, name, axis=axis)
        if p.op == "split" and p.attrs["axis"] % rank == axis:
            offset = sum(p.attrs["sizes"][:[id(r) for r in p.results].index(id(w))])
            return self.take(p.operands[0], axis, _shift(ranges, offset))
        if p.op == "stack":
            sax = p.attrs["axis"] % rank
            if axis == sax:  # whole items (experts): only theirs are read
                parts = [self._derive("stack", p.operands[a:b], name, axis=sax) for a, b in ranges]
                return parts[0] if len(parts) == 1 else self._derive("concat", parts, name, axis=sax)
            inner = axis - (axis > sax)
            return self._derive("stack", [self.take(x, inner, ranges) for x in p.operands], name, axis=sax)
        if p.op in ("cast", "shift", "scale") and len(p.operands) == 1:
            return self._derive(p.op, [self.take(p.operands[0], axis, ranges)], name, **p.attrs)
        if p.op == "deinterleave_rows" and axis == 0:
            per = w.type.shape[0] // p.attrs["groups"]
            if all(a % per == 0 and b % per == 0 for a, b in ranges):
                part = self.take(p.operands[0], 0, ranges)
                return self._derive("deinterleave_rows", [part], name, groups=_total(ranges) // per)
        # anything else: the share of the computed weight (the loader reads the whole checkpoint tensors)
        if not self.is_weight(w):
            raise self.error(f"%{w.name} is computed in the body, so its share cannot be taken at load time")
        parts = [self._derive("slice", [w], name, axis=axis, start=a, stop=b) for a, b in ranges]
        return parts[0] if len(parts) == 1 else self._derive("concat", parts, name, axis=axis)

    def is_weight(self, v: Value) -> bool:
        """A parameter, or computed from parameters alone (a load-time op, or a fusion's concat not yet lifted)."""
        if any(v is p for p in self.fn.params):
            return True
        p = self.producer(v)
        return p is not None and not p.opdef.effects and bool(p.operands) and all(self.is_weight(x)
                                                                                  for x in p.operands)

    def _derive(self, opname: str, operands, name: str, **attrs) -> Value:
        op = self.rw.make(opname, list(operands), name, attrs)
        self.fn.derived.append(op)
        return op.result


def _share_name(name: str) -> str:
    """`q_proj.weight` -> `q_proj_shard.weight`: a module path of its own, so a quantized share's scales and biases
    get their own names too."""
    stem, dot, leaf = name.rpartition(".")
    return f"{stem}_shard.{leaf}" if dot else f"{name}_shard"


class _Narrow:
    """Narrows values' last axis to index ranges, back through elementwise ops and fused splits to the matmuls that
    make them, whose weights then keep only those rows (column parallelism)."""

    _ELEMENTWISE = (OpGroup.UNARY, OpGroup.BINARY)

    def __init__(self, f: _Function):
        self.f = f
        self.ranges: dict[int, Ranges] = {}
        self.values: dict[int, Value] = {}
        self.sinks: set[int] = set()  # the ops that read a narrowed value and were adjusted for it
        self.plan: list[tuple] | None = None

    def want(self, v: Value, ranges: Ranges, sink: Operation) -> None:
        self.ranges[id(v)], self.values[id(v)] = ranges, v
        self.sinks.add(id(sink))

    def feasible(self) -> str | None:
        """None when every narrowed value can be traced to column-parallel matmuls, else why not."""
        try:
            self._plan()
        except ShardError as err:
            return str(err)
        return None

    def _plan(self) -> None:
        f = self.f
        ranges, values, readers = dict(self.ranges), dict(self.values), set(self.sinks)
        plan = []

        def want(v: Value, r: Ranges, reader: Operation) -> None:
            if id(v) in ranges and ranges[id(v)] != r:
                raise f.error(f"%{v.name} would need two different shares")
            ranges[id(v)], values[id(v)] = r, v
            readers.add(id(reader))

        for o in reversed(f.fn.ops):
            got = [ranges.get(id(r)) for r in o.results]
            if not any(g is not None for g in got):
                continue
            if o.op == "split" and o.attrs["axis"] % o.operands[0].type.rank == o.operands[0].type.rank - 1:
                if any(g is None for g in got):
                    raise f.error(f"only some parts of split %{o.results[0].name} are divided")
                combined, offset = (), 0
                for size, g in zip(o.attrs["sizes"], got):
                    combined += _shift(g, offset)
                    offset += size
                plan.append(("split", o, [_total(g) for g in got]))
                want(o.operands[0], combined, o)
            elif o.opdef.group in self._ELEMENTWISE and len(o.results) == 1 and o.op not in ("quantize", "pack",
                                                                                               "dequantize"):
                r = got[0]
                for x in o.operands:
                    if x.type.rank and x.type.shape[-1] == o.result.type.shape[-1]:
                        if f.is_weight(x):
                            plan.append(("weight", o, x, r))
                        else:
                            want(x, r, o)
                readers.add(id(o))
            elif o.op == "linear":
                plan.append(("rows", o, got[0]))
                readers.add(id(o))
            else:
                raise f.error(f"%{o.results[0].name} comes from {o.op}, which cannot be divided by features "
                              "(e.g. a norm over all heads); use --parallel pipeline")
        for key, v in values.items():
            if v in f.fn.inputs or v in f.fn.params:
                raise f.error(f"%{v.name} is an input of the function, which every rank holds whole")
            for u in f.users(v):
                if id(u) not in readers:
                    raise f.error(f"%{v.name} is also read whole by {u.op} (%{u.results[0].name})")
            if any(v is out for out in f.fn.outputs):
                raise f.error(f"%{v.name} is returned whole")
        self.plan = plan

    def apply(self) -> None:
        f = self.f
        if self.plan is None:
            self._plan()
        for step in self.plan:
            if step[0] == "split":
                step[1].attrs["sizes"] = type(step[1].attrs["sizes"])(step[2])
            elif step[0] == "weight":
                _, o, x, r = step
                o.operands = [f.take(x, x.type.rank - 1, r) if v is x else v for v in o.operands]
            else:
                _, o, r = step
                o.operands[1] = f.take(o.operands[1], 0, r)
                if len(o.operands) > 2:
                    o.operands[2] = f.take(o.operands[2], 0, r)
                f.done.add(id(o))


def _sort_derived(fn: Function) -> None:
    """Load-time ops in dependency order (shares are appended after the ops that read them)."""
    made = {id(v) for v in fn.params}
    pending, out = list(fn.derived), []
    while pending:
        ready = [o for o in pending if all(id(v) in made for v in o.operands)]
        if not ready:
            raise ShardError(f"@{fn.name}: load-time ops depend on each other in a cycle")
        for o in ready:
            out.append(o)
            made.update(id(r) for r in o.results)
        pending = [o for o in pending if all(o is not r for r in ready)]
    fn.derived = out


# ------------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Read:
    """What the loader reads for one parameter of a rank's program: checkpoint tensor `name`, whole (`axis` None)
    or entries start .. stop - 1 along `axis`."""

    name: str
    axis: int | None = None
    start: int = 0
    stop: int = 0


def loading_program(program: Program) -> tuple[Program, dict[str, Read]]:
    """A rank's program as it runs, and what to read for each of its parameters (by global name).

    Each `slice` of a checkpoint tensor becomes a parameter of its own, read directly, so no rank holds a tensor it
    keeps only part of; a pipeline stage's layers are numbered from 0 (generated modules keep layers in a list),
    and the reads name the checkpoint's layers."""
    program = copy.deepcopy(program)
    local: dict[tuple[str, str], Read] = {}
    for fn in program.functions:
        params = {id(p): p for p in fn.params}
        for section in (fn.derived, fn.ops):
            for o in list(section):
                if o.op == "slice" and id(o.operands[0]) in params:
                    section.remove(o)
                    fn.params.append(o.result)
                    whole = o.operands[0]
                    local[(fn.name, o.result.name)] = Read(whole.name, o.attrs["axis"] % whole.type.rank,
                                                           o.attrs["start"], o.attrs["stop"])
        used = {id(v) for o in fn.all_ops() for v in o.operands}
        fn.params = [p for p in fn.params if id(p) in used]
        for p in fn.params:
            local.setdefault((fn.name, p.name), Read(p.name))
    renamed = _renumber_layers(program.main)
    reads: dict[str, Read] = {}

    def walk(fn: Function, new: str, old: str) -> None:
        for p in fn.params:
            r = local[(fn.name, p.name)]
            reads[new + p.name] = Read(old + r.name, r.axis, r.start, r.stop)
        for o in fn.ops:
            if o.op == "call":
                sub = o.attrs["prefix"]
                was = renamed.get(id(o), sub)
                walk(program[o.attrs["callee"]], new + (sub + "." if sub else ""), old + (was + "." if was else ""))

    walk(program.main, "", "")
    return verify(program), reads


def _renumber_layers(main: Function) -> dict[int, str]:
    """Call prefixes `name.<i>` numbered from 0 in each family; returns call op id -> its former prefix."""
    families: dict[str, list[Operation]] = {}
    for o in main.ops:
        m = _LAYER.fullmatch(o.attrs["prefix"]) if o.op == "call" else None
        if m:
            families.setdefault(m.group(1), []).append(o)
    renamed = {}
    for name, calls in families.items():
        low = min(int(_LAYER.fullmatch(c.attrs["prefix"]).group(2)) for c in calls)
        for c in calls:
            i = int(_LAYER.fullmatch(c.attrs["prefix"]).group(2))
            if low:
                renamed[id(c)] = c.attrs["prefix"]
                c.attrs["prefix"] = f"{name}.{i - low}"
    return renamed
