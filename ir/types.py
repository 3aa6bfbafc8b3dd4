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
    """Affine group quantization of a weight, MLX's layout: `w = scale * q + bias` per group along the last axis
    (codes packed low bits first into uint32 words; groups of 32, 64 or 128, or 16 for GGUF Q6_K's 8-bit codes).

    `scales`: the dtype scales and biases are stored in when it is not the tensor's own (GGUF's float16 scales
    under a float32 model: exact in float32, half the bytes). `packed`: the native CPU kernels' layout (16 rows side
    by side, `mlxc.kernels.native.pack`), which only those kernels read. Printed `q4g32`, `q4g32_f16`,
    `q4g32_f16_packed`."""

    bits: int
    group_size: int
    scales: "DType | None" = None
    packed: bool = False

    BITS = (2, 3, 4, 5, 6, 8)  # the widths MLX's affine quantization supports
    GROUP_SIZES = (32, 64, 128)  # and its group sizes
    # Group 16 with 8-bit codes and float32 scales is GGUF Q6_K as loaded (w = d*sc*(q - 32): scale d*sc, bias -32
    # scale, per 16 weights). MLX dequantizes it exactly but neither quantizes nor multiplies it (its quantized
    # matmul returns wrong numbers for it without an error), so mlxc's packed native kernels read it, or the
    # reference path dequantizes it before the matmul.

    @property
    def mlx_matmul(self) -> bool:
        """Whether MLX's quantized matmul (`quantized_matmul`, `gather_qmm`) computes with this layout."""
        return self.group_size in self.GROUP_SIZES

    def __str__(self) -> str:
        text = f"q{self.bits}g{self.group_size}"
        if self.scales is not None:
            text += f"_{self.scales.value}"
        return text + ("_packed" if self.packed else "")

    def scale_dtype(self, dtype: "DType") -> "DType":
        """The dtype of the scales and biases of a tensor of `dtype` with this quantization."""
        return self.scales or dtype

    def with_layout(self, *, scales: "DType | None" = ..., packed: bool | None = None) -> "Quant":
        return Quant(self.bits, self.group_size, self.scales if scales is ... else scales,
                     self.packed if packed is None else packed)

    @staticmethod
    def storage_names(name: str) -> tuple[str, str, str]:
        """A quantized parameter is stored as three arrays: packed codes, per-group scales, per-group biases."""
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        return name, base + ".scales", base + ".biases"

    PATTERN = r"q(\d+)g(\d+)(?:_(f32|f16|bf16))?(_packed)?"

    @classmethod
    def parse(cls, text: str) -> "Quant":
        m = re.fullmatch(cls.PATTERN, text)
        if m is None:
            raise ValueError(f"bad quantization {text!r}; expected e.g. q4g32 or q4g32_f16")
        return cls(int(m.group(1)), int(m.group(2)), DType(m.group(3)) if m.group(3) else None, bool(m.group(4)))


@dataclass(frozen=True)
class TensorType:
    """A tensor's element type and shape; `quant` marks a weight stored quantized (dtype is then its scales')."""

    dtype: DType
    shape: tuple[Dim, ...]
    quant: Quant | None = None

    def __post_init__(self) -> None:
        # one spelling per type: scales stored in the tensor's own dtype are the default
        if self.quant is not None and self.quant.scales == self.dtype:
            object.__setattr__(self, "quant", self.quant.with_layout(scales=None))

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
