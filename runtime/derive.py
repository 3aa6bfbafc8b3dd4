"""Runs a program's load-time `derive` ops (fused weight concats, quantize/dequantize, LoRA merges) on weights.

This is the one place weight transforms execute; an artifact stores their results, so they run once per compile.
Each op runs through its MLX implementation in `codegen/mlx_ops.py`, the same fragment the generated module uses;
only quantized storage (concatenating codes, quantizing) is handled here, because only loaded weights carry it.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace
from typing import Iterator, Mapping

import mlx.core as mx
import numpy as np

from ..codegen.mlx_ops import IMPLEMENTATIONS
from ..codegen.module import helper_namespace
from ..ir import Function, Operation, Program, Value
from ..ir.errors import MlxcError
from .weights import QuantizedTensor, Tensor, conform


def _concat(xs: list[Tensor], axis: int) -> QuantizedTensor:
    """Quantized rows joined as stored: codes, scales and biases each concatenated (groups stay intact)."""
    parts = [mx.concatenate([getattr(x, f) for x in xs], axis=axis) for f in ("codes", "scales", "biases")]
    return QuantizedTensor(*parts, xs[0].quant)


@lru_cache(maxsize=512)
def _compiled(source: str):
    return compile(source, "<derive>", "eval")


@lru_cache(maxsize=64)
def _globals(helpers: tuple[str, ...]) -> dict:
    return helper_namespace(helpers)


def run_op(op: Operation, args: list[Tensor]) -> list[Tensor]:
    """One load-time op on weights, through the op's MLX implementation (the fragment codegen writes)."""
    if op.op == "quantize":
        out = args[0]  # conform() below quantizes to the result type with MLX's quantizer
    elif op.op == "concat" and any(isinstance(a, QuantizedTensor) for a in args):
        out = _concat(args, op.attrs["axis"])
    elif op.op == "deinterleave_rows" and isinstance(args[0], QuantizedTensor):
        rows, groups = args[0].shape[0], op.attrs["groups"]
        out = args[0].take_rows(np.arange(rows).reshape(groups, rows // groups // 2, 2).swapaxes(1, 2).reshape(-1))
    else:
        impl = IMPLEMENTATIONS.get(op.op)
        if impl is None or op.opdef.effects:
            raise MlxcError(f"op {op.op} cannot run at load time")
        env, names = {}, []
        for i, a in enumerate(args):
            if isinstance(a, QuantizedTensor):  # its storage arrays, reachable the way generated code names them
                env[f"q{i}"] = SimpleNamespace(weight=a.codes, scales=a.scales, biases=a.biases)
                names.append(f"q{i}.weight")
            else:
                env[f"a{i}"] = a
                names.append(f"a{i}")
        scope = _globals(impl.helpers)
        if impl.constant is not None:  # e.g. rope's frequency table: built once per distinct source, as in a module
            env["const"] = eval(_compiled(impl.constant(op.attrs)[1]), scope)  # noqa: S307
            names.insert(0, "const")
        source = impl.fragment(names, op.attrs, [v.type for v in op.operands])
        out = eval(_compiled(source), scope, env)  # noqa: S307 - mlxc's own fragments
        q = op.results[0].type.quant
        if len(op.results) == 1 and q is not None:  # a quantized result comes back as its storage arrays (`pack`)
            out = QuantizedTensor(*out, q, op.results[0].type.shape[0] if q.packed else None)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [conform(x, r.type) for x, r in zip(outs, op.results)]


EXPANDING = ("dequantize", "pack")


def expansions(fn: Function) -> list[Operation]:
    """Load-time ops an artifact re-runs when it loads instead of storing their results: `dequantize` and `pack`
    ops whose results only the body reads. A float copy of a quantized weight is several times its storage, and a
    packed copy is the kernels' private layout, so an artifact keeps the codes in MLX's layout and the target's
    weights are made again at load."""
    body_reads = {id(v) for o in fn.ops for v in o.operands}
    derive_reads = {id(v) for o in fn.derived for v in o.operands}
    return [o for o in fn.derived if o.op in EXPANDING
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
