"""A custom kernel: its Metal body (and CUDA twin) beside this file, and one launch description that every
implementation runs from — `mx.fast.metal_kernel` on an Apple GPU, the emulator on any machine, `mx.fast.cuda_kernel`
where MLX has a CUDA back-end.

Bodies live in `NAME.metal` / `NAME.cu`; helpers shared by several kernels in `common.metal` / `common.cuh`, passed
as the kernel's `header`. Specialisation (dtype, head size, state size, feature flags) is by MLX template arguments,
so each distinct specialisation is one source MLX compiles once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from .source import MetalSource, TemplateArg, render_cuda, render_metal

HERE = Path(__file__).parent


@dataclass(frozen=True)
class KernelDef:
    """The parts of `mx.fast.metal_kernel(...)` that do not depend on the call."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    body_file: str
    header_files: tuple[str, ...] = ("common.metal",)
    cuda_body_file: str | None = None
    cuda_header_files: tuple[str, ...] = ("common.cuh",)
    body_override: str | None = None  # tests inject broken bodies here (see `with_body`)

    @cached_property
    def body(self) -> str:
        if self.body_override is not None:
            return self.body_override
        return (HERE / self.body_file).read_text()

    @cached_property
    def header(self) -> str:
        return "".join((HERE / f).read_text() for f in self.header_files)

    @cached_property
    def cuda_body(self) -> str | None:
        return None if self.cuda_body_file is None else (HERE / self.cuda_body_file).read_text()

    @cached_property
    def cuda_header(self) -> str:
        return "".join((HERE / f).read_text() for f in self.cuda_header_files)

    def with_body(self, body: str) -> "KernelDef":
        """The same kernel with another body (for tests that break a kernel on purpose)."""
        return replace(self, body_override=body)

    def metal_source(self, launch: "Launch") -> MetalSource:
        return render_metal(self.name, self.input_names, self.output_names, self.body, self.header, launch.inputs,
                            launch.output_dtypes, launch.template)

    def cuda_source(self, launch: "Launch") -> tuple[str, str]:
        if self.cuda_body is None:
            raise ValueError(f"kernel {self.name} has no CUDA twin")
        return render_cuda(self.name, self.input_names, self.output_names, self.cuda_body, self.cuda_header,
                           launch.inputs, launch.output_dtypes, launch.template)


@dataclass
class Launch:
    """One call of a kernel: what `kernel(inputs=..., template=..., grid=..., threadgroup=..., ...)` receives."""

    inputs: list[Any]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: list[TemplateArg] = field(default_factory=list)
    init_value: float | None = None


_MLX_KERNELS: dict[tuple[str, str, str], Any] = {}


def _metal_object(k: KernelDef):
    key = ("metal", k.name, k.body)
    if key not in _MLX_KERNELS:
        _MLX_KERNELS[key] = mx.fast.metal_kernel(name=k.name, input_names=list(k.input_names),
                                                 output_names=list(k.output_names), source=k.body, header=k.header)
    return _MLX_KERNELS[key]


def _cuda_object(k: KernelDef):
    key = ("cuda", k.name, k.cuda_body or "")
    if key not in _MLX_KERNELS:
        _MLX_KERNELS[key] = mx.fast.cuda_kernel(name=k.name, input_names=list(k.input_names),
                                                output_names=list(k.output_names), source=k.cuda_body,
                                                header=k.cuda_header)
    return _MLX_KERNELS[key]


def run_metal(k: KernelDef, launch: Launch) -> list[mx.array]:
    """On an Apple GPU: MLX's own custom-kernel path."""
    kw = dict(inputs=launch.inputs, template=launch.template, grid=launch.grid, threadgroup=launch.threadgroup,
              output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes)
    if launch.init_value is not None:
        kw["init_value"] = launch.init_value
    return _metal_object(k)(**kw)


def run_cuda(k: KernelDef, launch: Launch) -> list[mx.array]:
    """Under mlx[cuda]: the twin, with the same grid (MLX rounds it up to whole blocks)."""
    kw = dict(inputs=launch.inputs, template=launch.template, grid=launch.grid, threadgroup=launch.threadgroup,
              output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes)
    if launch.init_value is not None:
        kw["init_value"] = launch.init_value
    return _cuda_object(k)(**kw)


def run_emulated(k: KernelDef, launch: Launch, runs: int = 2, **kw) -> list[mx.array]:
    """On any machine: the exact Metal source in the emulator (raises EmulatorError on any finding)."""
    from ..emulator import emulate

    return emulate(k.metal_source(launch), launch.inputs, launch.output_shapes, launch.output_dtypes, launch.grid,
                   launch.threadgroup, launch.init_value, runs=runs, **kw)


def run(k: KernelDef, launch: Launch, impl: str) -> list[mx.array]:
    if impl == "metal":
        return run_metal(k, launch)
    if impl == "cuda":
        return run_cuda(k, launch)
    if impl == "emulated":
        return run_emulated(k, launch)
    raise ValueError(f"unknown kernel implementation {impl!r} (metal, cuda, emulated)")


def f32(x: mx.array | Sequence[float] | float) -> mx.array:
    return x.astype(mx.float32) if isinstance(x, mx.array) else mx.array(x, dtype=mx.float32)
