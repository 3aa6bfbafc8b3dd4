"""Tensor types: a dtype and a shape whose dims are ints or symbolic names such as `B` and `T`."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Union

Dim = Union[int, str]
"""A dimension: a known size, or a symbol (`B` batch, `T` sequence) bound when the program runs."""


class DType(str, enum.Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I32 = "i32"
    I64 = "i64"
    U32 = "u32"
    BOOL = "bool"

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16)

    @classmethod
    def parse(cls, name: str) -> "DType":
        aliases = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}
        try:
            return cls(aliases.get(name, name))
        except ValueError:
            raise ValueError(f"unknown dtype {name!r}; expected one of {[d.value for d in cls]}") from None


@dataclass(frozen=True)
class Quant:
    """Affine group quantization of a weight, MLX's layout: `w = scale * q + bias` per group along the last axis."""

    bits: int
    group_size: int

    BITS = (2, 3, 4, 5, 6, 8)  # the widths MLX's affine quantization supports
    GROUP_SIZES = (32, 64, 128)  # and its group sizes

    def __str__(self) -> str:
        return f"q{self.bits}g{self.group_size}"

    @staticmethod
    def storage_names(name: str) -> tuple[str, str, str]:
        """A quantized parameter is stored as three arrays: packed codes, per-group scales, per-group biases."""
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        return name, base + ".scales", base + ".biases"

    @classmethod
    def parse(cls, text: str) -> "Quant":
        m = re.fullmatch(r"q(\d+)g(\d+)", text)
        if m is None:
            raise ValueError(f"bad quantization {text!r}; expected e.g. q4g32")
        return cls(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class TensorType:
    """A tensor's element type and shape; `quant` marks a weight stored quantized (dtype is then its scales')."""

    dtype: DType
    shape: tuple[Dim, ...]
    quant: Quant | None = None

    def __str__(self) -> str:
        text = f"{self.dtype.value}[{', '.join(str(d) for d in self.shape)}]"
        return f"{text} {self.quant}" if self.quant else text

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape), self.quant)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape, self.quant)

    def with_quant(self, quant: Quant | None) -> "TensorType":
        return TensorType(self.dtype, self.shape, quant)
