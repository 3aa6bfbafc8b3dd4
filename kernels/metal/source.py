"""The source `mx.fast.metal_kernel` (and `mx.fast.cuda_kernel`) builds from a kernel body, byte for byte.

MLX writes the whole kernel around the body it is given (mlx/backend/common/metal_kernel.cpp, MLX 0.32.4):

- `header`, then for template arguments `template <typename T, int N, bool B>` (dtypes, ints, bools);
- `[[kernel]] void custom_kernel_NAME[_TEMPLATE]_INPUTDTYPES_OUTPUTDTYPES(` with one parameter per line: each input
  (`const device T*`, or `const constant T*` when it has fewer than 8 elements, `const constant T&` when it is 0-d)
  followed by the `NAME_shape` / `NAME_strides` / `NAME_ndim` buffers the **body** mentions, then the outputs
  (`device T*`, `device atomic<T>*` with `atomic_outputs`), then the thread-position attributes whose names occur
  in the body, in MLX's fixed order;
- the body, `}`, and for templates an explicit instantiation named with `[[host_name(..)]]`.

At compile time a Mac prepends `metal::utils()` (MLX's utilities prelude, `mlx/backend/metal/kernels/utils.h`);
that prelude is not part of the source MLX records, and the emulator supplies its own (emulator/metal.h).

MLX bug reproduced on purpose: with several outputs, a shape/stride/ndim buffer and no attribute in the body, the
signature is closed after an output too early (`) {`), so the source does not compile. `MetalSource.broken`
says so; `capture_metal_source` shows MLX doing the same.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx

# Inputs with fewer elements are passed in the constant address space (max_constant_array_size).
MAX_CONSTANT_ARRAY_SIZE = 8

# MLX's metal_attributes list, in its order: (name, type).
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

_METAL_TYPES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float64: "double",
    mx.complex64: "complex64_t", mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}
_CUDA_TYPES = {
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
    mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.float64: "double",
    mx.complex64: "mlx::core::cu::complex64_t",
}


def metal_type(dtype: mx.Dtype) -> str:
    """MLX's get_type_string."""
    return _METAL_TYPES[dtype]


def cuda_type(dtype: mx.Dtype) -> str:
    """MLX's dtype_to_cuda_type."""
    return _CUDA_TYPES[dtype]


@dataclass(frozen=True)
class ArgInfo:
    """What the source depends on about one input: its dtype and shape (size decides device vs constant)."""

    dtype: mx.Dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, x: Any) -> "ArgInfo":
        if isinstance(x, ArgInfo):
            return x
        return cls(x.dtype, tuple(int(d) for d in x.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


TemplateArg = tuple[str, Any]  # (name, mx.Dtype | int | bool)


def _template_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return metal_type(v)


def _template_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return "typename"


def template_def(template: Sequence[TemplateArg]) -> str:
    """MLX's write_template: `<float, 3, 1>`."""
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


def _template_hash(tdef: str) -> str:
    out, i = [], 0
    while i < len(tdef):
        c = tdef[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(tdef) and tdef[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def metal_kernel_name(name: str, inputs: Sequence[ArgInfo], output_dtypes: Sequence[mx.Dtype],
                      template: Sequence[TemplateArg] = ()) -> str:
    kname = "custom_kernel_" + name
    if template:
        kname += "_" + _template_hash(template_def(template))
    for a in inputs:
        kname += "_" + metal_type(a.dtype)
        if a.ndim == 0:
            kname += "s"
        elif a.size < MAX_CONSTANT_ARRAY_SIZE:
            kname += "c"
    for d in output_dtypes:
        kname += "_" + metal_type(d)
    return kname


def shape_infos(body: str, input_names: Sequence[str]) -> list[tuple[bool, bool, bool]]:
    """Which of NAME_shape / NAME_strides / NAME_ndim the body mentions (a substring test, as MLX does)."""
    return [(f"{n}_shape" in body, f"{n}_strides" in body, f"{n}_ndim" in body) for n in input_names]


def attributes(body: str) -> list[tuple[str, str]]:
    """The thread-position attributes MLX adds: every name of its list that occurs in the body, in list order."""
    return [(name, typ) for name, typ in METAL_ATTRIBUTES if name in body]


@dataclass(frozen=True)
class Param:
    """One parameter of the generated signature, as the emulator's launcher must pass it.

    kind: "input" | "shape" | "strides" | "ndim" | "output" | "attr"; `index` is the input's (or output's) position.
    """

    kind: str
    name: str
    ctype: str
    index: int = -1
    scalar: bool = False
    constant: bool = False


@dataclass(frozen=True)
class MetalSource:
    """A kernel's full source as MLX generates it, with what is needed to call it."""

    kernel_name: str
    source: str
    params: tuple[Param, ...]
    template: str  # "<float, 3, 1>", or "" without template arguments
    broken: bool  # MLX's early-closed signature (see module doc)
    atomic_outputs: bool = False

    @property
    def buffers(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kind != "attr")


def render_metal(name: str, input_names: Sequence[str], output_names: Sequence[str], body: str, header: str,
                 inputs: Sequence[Any], output_dtypes: Sequence[mx.Dtype], template: Sequence[TemplateArg] = (),
                 atomic_outputs: bool = False) -> MetalSource:
    """The source `mx.fast.metal_kernel(name, input_names, output_names, body, header, atomic_outputs=...)` compiles
    when called with `inputs` (arrays or ArgInfo), `output_dtypes` and `template`."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    if len(inputs) != len(input_names):
        raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(input_names)} but got size "
                         f"{len(inputs)}.")
    if len(output_dtypes) != len(output_names):
        raise ValueError(f"[metal_kernel] Expected `output_dtypes` to have size {len(output_names)} but got size "
                         f"{len(output_dtypes)}.")
    args = [ArgInfo.of(x) for x in inputs]
    infos = shape_infos(body, input_names)
    attrs = attributes(body)
    kname = metal_kernel_name(name, args, output_dtypes, template)
    params: list[Param] = []
    src = [header]
    if template:
        src.append("template <" + ", ".join(f"{_template_kind(v)} {n}" for n, v in template) + ">\n")
    src.append(f"[[kernel]] void {kname}(\n")
    index = 0
    for i, (n, a) in enumerate(zip(input_names, args)):
        typ = metal_type(a.dtype)
        const = a.size < MAX_CONSTANT_ARRAY_SIZE
        ref = "&" if a.ndim == 0 else "*"
        src.append(f"  const {'constant' if const else 'device'} {typ}{ref} {n} [[buffer({index})]],\n")
        params.append(Param("input", n, typ, i, scalar=a.ndim == 0, constant=const))
        index += 1
        if a.ndim > 0:
            has_shape, has_strides, has_ndim = infos[i]
            if has_shape:
                src.append(f"  const constant int* {n}_shape [[buffer({index})]],\n")
                params.append(Param("shape", f"{n}_shape", "int", i))
                index += 1
            if has_strides:
                src.append(f"  const constant int64_t* {n}_strides [[buffer({index})]],\n")
                params.append(Param("strides", f"{n}_strides", "int64_t", i))
                index += 1
            if has_ndim:
                src.append(f"  const constant int& {n}_ndim [[buffer({index})]],\n")
                params.append(Param("ndim", f"{n}_ndim", "int", i, scalar=True))
                index += 1
    closed_at = None
    for i, (n, d) in enumerate(zip(output_names, output_dtypes)):
        typ = metal_type(d)
        ptype = f"atomic<{typ}>" if atomic_outputs else typ
        src.append(f"  device {ptype}* {n} [[buffer({index})]]")
        # MLX compares the running buffer index with inputs + outputs, not counting shape buffers
        if index < len(args) + len(output_names) - 1 or attrs:
            src.append(",\n")
        else:
            src.append(") {\n")
            if closed_at is None:
                closed_at = i
        params.append(Param("output", n, typ, i))
        index += 1
    for j, (a, typ) in enumerate(attrs):
        src.append(f"  {typ} {a} [[{a}]]")
        src.append(",\n" if j < len(attrs) - 1 else ") {\n")
        params.append(Param("attr", a, typ))
    src.append(body)
    src.append("\n}\n")
    tdef = ""
    if template:
        tdef = template_def(template)
        full = kname + tdef
        src.append(f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({full}) {full};\n')
    broken = closed_at is not None and closed_at < len(output_names) - 1
    return MetalSource(kname, "".join(src), tuple(params), tdef, broken, atomic_outputs)


# ------------------------------------------------------------------------------------------------ CUDA

CUDA_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


def cuda_kernel_name(name: str, template: Sequence[TemplateArg] = ()) -> str:
    """custom_kernel_NAME plus `_3` / `_t` / `_f` / `_float` per template argument (no dtype suffixes on CUDA)."""
    out = "custom_kernel_" + name
    for _, v in template:
        if isinstance(v, bool):
            out += "_t" if v else "_f"
        elif isinstance(v, int):
            out += f"_{v}"
        else:
            out += "_" + metal_type(v)
    return out


def render_cuda(name: str, input_names: Sequence[str], output_names: Sequence[str], body: str, header: str,
                inputs: Sequence[Any], output_dtypes: Sequence[mx.Dtype],
                template: Sequence[TemplateArg] = ()) -> tuple[str, str]:
    """(kernel name, source) as `mx.fast.cuda_kernel` builds them (mlx/backend/cuda/custom_kernel.cpp): inputs as
    `const T*` (0-d ones too), `__grid_constant__ Shape/Strides/int` shape info, template arguments as constexprs."""
    args = [ArgInfo.of(x) for x in inputs]
    infos = shape_infos(body, input_names)
    kname = cuda_kernel_name(name, template)
    src = [CUDA_DEFAULT_HEADER, header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
           f"__global__ void {kname}(\n"]
    for i, (n, a) in enumerate(zip(input_names, args)):
        src.append(f"    const {cuda_type(a.dtype)}* {n},\n")
        if a.ndim > 0:
            has_shape, has_strides, has_ndim = infos[i]
            if has_shape:
                src.append(f"    const __grid_constant__ Shape {n}_shape,\n")
            if has_strides:
                src.append(f"    const __grid_constant__ Strides {n}_strides,\n")
            if has_ndim:
                src.append(f"    const __grid_constant__ int {n}_ndim,\n")
    for i, (n, d) in enumerate(zip(output_names, output_dtypes)):
        src.append(f"    {cuda_type(d)}* {n}")
        src.append(",\n" if i < len(output_names) - 1 else ") {\n")
    if template:
        for n, v in template:
            if isinstance(v, bool):
                src.append(f"  constexpr bool {n} = {'true' if v else 'false'};\n")
            elif isinstance(v, int):
                src.append(f"  constexpr int {n} = {v};\n")
            else:
                src.append(f"  using {n} = {cuda_type(v)};\n")
        src.append("\n")
    src.append(body)
    src.append("\n}\n\n} // namespace mlx::core::cu\n")
    return kname, "".join(src)


# ------------------------------------------------------------------------------------------------ MLX's own source


@dataclass(frozen=True)
class Captured:
    kernel_name: str
    source: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]


def parse_exported(data: bytes) -> Captured:
    """The CustomKernel primitive's fields from an `mx.export_function` file: name, source, grid, threadgroup."""
    tag = struct.pack("<Q", len(b"CustomKernel")) + b"CustomKernel"
    at = data.find(tag)
    if at < 0:
        raise ValueError("no CustomKernel primitive in the exported function")
    pos = at + len(tag)

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        s = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        return s

    kname = string()
    source = string()
    dims = struct.unpack_from("<6i", data, pos)
    return Captured(kname, source, tuple(dims[:3]), tuple(dims[3:]))


def capture_metal_source(name: str, input_names: Sequence[str], output_names: Sequence[str], body: str,
                         header: str, inputs: Sequence[mx.array], output_shapes: Sequence[Sequence[int]],
                         output_dtypes: Sequence[mx.Dtype], grid: tuple[int, int, int],
                         threadgroup: tuple[int, int, int], template: Sequence[TemplateArg] = (),
                         atomic_outputs: bool = False, init_value: float | None = None) -> Captured:
    """MLX's own generated source for a kernel call, recorded by `mx.export_function` without running it (the call
    itself raises "No Metal back-end" on machines without Metal, but export tracing records it)."""
    kernel = mx.fast.metal_kernel(name=name, input_names=list(input_names), output_names=list(output_names),
                                  source=body, header=header, atomic_outputs=atomic_outputs)

    def call(*xs):
        kw = dict(inputs=list(xs), output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes),
                  grid=tuple(grid), threadgroup=tuple(threadgroup))
        if template:
            kw["template"] = list(template)
        if init_value is not None:
            kw["init_value"] = init_value
        return kernel(**kw)

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.mlxfn")
        mx.export_function(path, call, *inputs)
        with open(path, "rb") as f:
            return parse_exported(f.read())
