"""convert-dtype: the program's compute dtype (its float parameters and activations) becomes another float dtype.

Loading an artifact compiled in float32 with `--dtype float16` is this pass plus a cast of the stored weights: the
program stays the single description of what runs, so the dump, the generated module and the weights agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import DType, Program, TensorType
from ..ir.errors import MlxcError
from .base import Pass, PassReport


def compute_dtype(program: Program) -> DType:
    """The float dtype of the model's outputs, which is the dtype its weights and activations were lowered in."""
    return program.main.outputs[0].type.dtype


@dataclass(frozen=True)
class ConvertDType(Pass):
    """Every value, parameter and `cast` target in the compute dtype moves to `dtype`; other dtypes stay."""

    name = "convert-dtype"
    dtype: DType = DType.F32

    def run(self, program: Program) -> tuple[Program, PassReport]:
        if not self.dtype.is_float:
            raise MlxcError(f"convert-dtype needs a float dtype, got {self.dtype.value}")
        source = compute_dtype(program)
        changed = 0

        def convert(t: TensorType) -> TensorType:
            nonlocal changed
            if t.dtype != source or source == self.dtype:
                return t
            changed += 1
            return t.with_dtype(self.dtype)

        for fn in program.functions:
            for v in fn.inputs + fn.params:
                v.type = convert(v.type)
            for o in fn.all_ops():
                if o.op == "cast" and o.attrs["dtype"] == source:
                    o.attrs["dtype"] = self.dtype
                for r in o.results:
                    r.type = convert(r.type)
        return program, PassReport(self.name, {"retyped": changed})
