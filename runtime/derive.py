"""Runs a program's load-time `derive` ops (fused weight concats, quantize/dequantize, LoRA merges) on weights.

This is the one place weight transforms execute; an artifact stores their results, so they run once per compile.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import mlx.core as mx
import mlx.nn as nn

from ..ir import Function, Operation, Program, Value
from ..ir.errors import MlxcError
from .weights import QuantizedTensor, Tensor, conform


def _float(x: Tensor) -> mx.array:
    return x.dequantize() if isinstance(x, QuantizedTensor) else x


def _concat(xs: list[Tensor], axis: int) -> Tensor:
    if all(isinstance(x, QuantizedTensor) for x in xs) and len({x.quant for x in xs}) == 1:
        parts = [mx.concatenate([getattr(x, f) for x in xs], axis=axis) for f in ("codes", "scales", "biases")]
        return QuantizedTensor(*parts, xs[0].quant)
    return mx.concatenate([_float(x) for x in xs], axis=axis)


def _linear(args: list[Tensor]) -> mx.array:
    y = _float(args[0]) @ _float(args[1]).T
    return y + _float(args[2]) if len(args) > 2 else y


_OPS: dict[str, Callable[[list[Tensor], dict], object]] = {
    "concat": lambda a, k: _concat(a, k["axis"]),
    "split": lambda a, k: mx.split(_float(a[0]), [sum(k["sizes"][: i + 1]) for i in range(len(k["sizes"]) - 1)],
                                   axis=k["axis"]),
    "quantize": lambda a, k: a[0],  # conform() below quantizes to the result type
    "dequantize": lambda a, k: _float(a[0]),
    "cast": lambda a, k: _float(a[0]),
    "add": lambda a, k: _float(a[0]) + _float(a[1]),
    "mul": lambda a, k: _float(a[0]) * _float(a[1]),
    "linear": lambda a, k: _linear(a),
    "transpose": lambda a, k: _float(a[0]).transpose(*k["perm"]),
    "reshape": lambda a, k: _float(a[0]).reshape(*k["shape"]),
    "silu": lambda a, k: nn.silu(_float(a[0])),
    "gelu": lambda a, k: nn.gelu(_float(a[0])),
    "gelu_tanh": lambda a, k: nn.gelu_approx(_float(a[0])),
    "relu": lambda a, k: nn.relu(_float(a[0])),
    "scale": lambda a, k: _float(a[0]) * k["factor"],
    "embed": lambda a, k: _float(a[1])[_float(a[0])],
    "rms_norm": lambda a, k: mx.fast.rms_norm(_float(a[0]), _float(a[1]), k["eps"]),
    "layer_norm": lambda a, k: mx.fast.layer_norm(*(_float(x) for x in a), *([None] * (3 - len(a))), k["eps"]),
}


def run_op(op: Operation, args: list[Tensor]) -> list[Tensor]:
    fn = _OPS.get(op.op)
    if fn is None:
        raise MlxcError(f"op {op.op} cannot run at load time")
    out = fn(args, op.attrs)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [conform(x, r.type) for x, r in zip(outs, op.results)]


def expansions(fn: Function) -> list[Operation]:
    """Load-time ops an artifact re-runs when it loads instead of storing their results: `dequantize` ops whose
    results only the body reads. A float copy of a quantized weight is several times its storage, so an artifact
    keeps the codes and the target's float weights are made again at load."""
    body_reads = {id(v) for o in fn.ops for v in o.operands}
    derive_reads = {id(v) for o in fn.derived for v in o.operands}
    return [o for o in fn.derived if o.op == "dequantize"
            and all(id(r) in body_reads and id(r) not in derive_reads for r in o.results)]


def stored_values(fn: Function) -> list[Value]:
    """What an artifact stores for a function: its runtime parameters, with each expansion's input in place of its
    result."""
    exp = expansions(fn)
    made = {id(r) for o in exp for r in o.results}
    out = [v for v in fn.runtime_params() if id(v) not in made]
    for o in exp:
        out += [v for v in o.operands if all(v is not w for w in out)]
    return out


def stored_parameters(program: Program) -> Iterator[tuple[str, Value]]:
    """(global name, value) of everything an artifact stores, in call order."""
    seen: set[str] = set()
    for prefix, fn in program.call_paths():
        for v in stored_values(fn):
            if prefix + v.name not in seen:
                seen.add(prefix + v.name)
                yield prefix + v.name, v


STAGES = ("checkpoint", "stored", "runtime")


def run_derived(program: Program, tensors: Mapping[str, Tensor], given: str = "checkpoint",
                want: str = "runtime") -> dict[str, Tensor]:
    """Tensors by global name at stage `want`, from tensors by global name at stage `given`.

    Stages: `checkpoint` (the program's parameters), `stored` (what an artifact keeps), `runtime` (what the
    generated module holds). Going from checkpoint runs the load-time ops; from stored, only the expansions.
    """
    if given not in STAGES[:2] or want not in STAGES[1:] or STAGES.index(want) <= STAGES.index(given):
        raise ValueError(f"cannot derive {want} tensors from {given} tensors")
    out: dict[str, Tensor] = {}
    for prefix, fn in program.call_paths():
        start = fn.params if given == "checkpoint" else stored_values(fn)
        env = {id(v): tensors[prefix + v.name] for v in start}
        exp = {id(o) for o in expansions(fn)}
        for op in fn.derived:
            if given == "stored" and id(op) not in exp:
                continue
            if want == "stored" and id(op) in exp:
                continue
            for r, value in zip(op.results, run_op(op, [env[id(v)] for v in op.operands])):
                env[id(r)] = value
        for v in (fn.runtime_params() if want == "runtime" else stored_values(fn)):
            out[prefix + v.name] = env[id(v)]
    return out
