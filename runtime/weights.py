"""Checkpoint tensors -> the program's parameters: read safetensors (sharded or not), rename, check, cast."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

import mlx.core as mx
import numpy as np

from ..ir import DType, Program, Quant, TensorType, Value
from ..files import check_safetensors
from ..ir.errors import MlxcError
from .budget import release_free_memory

MX_DTYPE = {DType.F32: mx.float32, DType.F16: mx.float16, DType.BF16: mx.bfloat16, DType.I32: mx.int32}


class WeightError(MlxcError):
    pass


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: the shards listed by `model.safetensors.index.json`, else `*.safetensors`."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
            raise WeightError(f"{index}: malformed shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightError(f"{index}: malformed shard index (weight_map must map tensor names to file names)")
        names = list(dict.fromkeys(weight_map.values()))
        outside = [f for f in names if Path(f).name != f or f in ("", ".", "..")]
        if outside:  # a shard is a file in the checkpoint's own directory, never a path elsewhere
            raise WeightError(f"{index} lists shard {outside[0]!r}, which is not a file name in {directory}")
        files = [directory / f for f in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index} lists shard {missing[0]} which is not in {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightError(f"no *.safetensors weights in {directory}")
    return files


def read_safetensors(files: Iterable[Path]) -> dict[str, mx.array]:
    """Lazily loaded arrays (MLX reads a tensor's bytes from the file when it is first evaluated); each file's
    header is checked first (`files.check_safetensors`)."""
    tensors: dict[str, mx.array] = {}
    for f in files:
        check_safetensors(f, WeightError)
        try:
            part = mx.load(str(f))
        except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
            raise WeightError(f"cannot read {f}: {e}") from None
        for name, arr in part.items():
            if name in tensors:
                raise WeightError(f"tensor {name} appears in more than one shard ({f.name})")
            tensors[name] = arr
    return tensors


def rename(tensors: Mapping[str, mx.array], to_ir: Callable[[str], str | None], unmapped: object) -> dict[str, mx.array]:
    """Apply a frontend's name map. `None` means deliberately ignored; `unmapped` means not understood."""
    out: dict[str, mx.array] = {}
    for name, arr in tensors.items():
        ir_name = to_ir(name)
        if ir_name is None:
            continue
        if ir_name is unmapped:
            raise WeightError(f"unexpected tensor {name} in checkpoint: it matches no parameter of this architecture")
        out[ir_name] = arr
    return out


@dataclass(frozen=True)
class QuantizedTensor:
    """A checkpoint tensor already in MLX's affine layout (e.g. a GGUF Q4_1 block read by `mx.load`), or in the
    native kernels' packed layout (`quant.packed`, made by the load-time `pack` op; `rows` is then W's row count)."""

    codes: mx.array
    scales: mx.array
    biases: mx.array
    quant: Quant
    rows: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.quant.packed:
            return (self.rows, self.codes.shape[1] // (8 * self.quant.bits) * 4)
        return (*self.codes.shape[:-1], self.codes.shape[-1] * 32 // self.quant.bits)

    def dequantize(self) -> mx.array:
        """In float32, as GGUF readers do: fp16 scales times codes rounded once, not in fp16."""
        if self.quant.packed:
            raise WeightError("packed weights are made at load time and never dequantized")
        q = self.quant
        codes, scales, biases = self.codes, self.scales.astype(mx.float32), self.biases.astype(mx.float32)
        if codes.ndim == 1:  # a vector in blocks (GGUF lets any tensor be quantized); mx.dequantize wants rows
            return mx.dequantize(codes[None], scales[None], biases[None], group_size=q.group_size, bits=q.bits)[0]
        return mx.dequantize(codes, scales, biases, group_size=q.group_size, bits=q.bits)


    def take_rows(self, order) -> "QuantizedTensor":
        """Reorder output rows; each row's groups travel with it, so this is exact."""
        idx = mx.array(order)
        return QuantizedTensor(self.codes[idx], self.scales[idx], self.biases[idx], self.quant)


Tensor = Union[mx.array, QuantizedTensor]

# GGUF block types that are MLX's affine layout exactly (d * q + m per block of 32), so `mx.load` keeps them quantized,
# with their float16 scales.
GGUF_MLX = {t: Quant(bits, 32, DType.F16) for t, bits in (("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8))}
# K-quants, affine too with float32 scales (an f16 super-block scale times a 6- or 8-bit sub-block scale, exact):
# Q4_K per 32 weights, Q6_K per 16 (8-bit codes 0..63, bias -32 scale). `slices._k_blocks` reads them.
GGUF_K = {"Q4_K": Quant(4, 32, DType.F32), "Q6_K": Quant(8, 16, DType.F32)}
GGUF_NATIVE = {**GGUF_MLX, **GGUF_K}
def gguf_native_types(ckpt) -> dict[str, Quant]:
    """GGUF tensor name -> the Quant it is kept as (`GGUF_NATIVE`), from the tensor table alone (no data is read: a
    block with a non-finite scale stays quantized and gives NaN where gguf's dequantizer does, as Q4_0's always did)."""
    return {name: GGUF_NATIVE[info.ggml_type] for name, info in ckpt.tensor_infos.items()
            if info.ggml_type in GGUF_NATIVE}


def read_gguf_blocks(path: Path, types: Mapping[str, Quant], ckpt=None) -> dict[str, QuantizedTensor]:
    """The named tensors (GGUF names, all of `GGUF_NATIVE` types) as quantized codes, scales and biases. MLX's reader
    takes a file of Q4_0/Q4_1/Q8_0 blocks; a file with K-quants (which MLX would dequantize to float16, all of
    them) is read block by block (`slices._affine_blocks`) from `ckpt` (`frontends.gguf.read_gguf`)."""
    if ckpt is not None and any(i.ggml_type in GGUF_K for i in ckpt.tensor_infos.values()):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        from .slices import _affine_blocks

        out = {}
        for name, quant in types.items():
            info = ckpt.tensor_infos[name]
            size = GGML_QUANT_SIZES[GGMLQuantizationType[info.ggml_type]][1]
            raw = np.asarray(ckpt.raw(name))
            out[name] = _affine_blocks(raw.reshape(raw.shape[:-1] + (-1, size)), info.ggml_type, quant)
        return out
    try:
        arrays = mx.load(str(path))
    except Exception as e:
        raise WeightError(f"cannot read {path}: {e}") from None
    out = {}
    for name, quant in types.items():
        codes, scales, biases = Quant.storage_names(name)
        if codes not in arrays or scales not in arrays:
            raise WeightError(f"{path}: MLX did not read tensor {name} as quantized blocks")
        out[name] = QuantizedTensor(arrays[codes], arrays[scales], arrays[biases], quant)
    return out


def conform(arr: Tensor, t: TensorType) -> Tensor:
    """`arr` in the form type `t` asks for: cast, quantized (MLX's quantizer) or dequantized as needed. Quantized
    weights keep their codes; scales and biases take the dtype the type gives them (`Quant.scales`, else the
    tensor's), so GGUF's float16 scales stay float16 where the program keeps them so."""
    dtype = MX_DTYPE[t.dtype]
    if t.quant is None:
        if isinstance(arr, QuantizedTensor):
            arr = arr.dequantize()
        return arr if arr.dtype == dtype else arr.astype(dtype)
    q = t.quant
    scale_dtype = MX_DTYPE[q.scale_dtype(t.dtype)]
    same = isinstance(arr, QuantizedTensor) and (arr.quant.bits, arr.quant.group_size, arr.quant.packed) == \
        (q.bits, q.group_size, q.packed)
    if same:
        cast = (lambda a: a) if arr.scales.dtype == scale_dtype else (lambda a: a.astype(scale_dtype))  # noqa: E731
        return replace(arr, scales=cast(arr.scales), biases=cast(arr.biases), quant=q)
    if q.packed or (isinstance(arr, QuantizedTensor) and arr.quant.packed):
        raise WeightError(f"cannot convert a {arr.quant if isinstance(arr, QuantizedTensor) else 'float'} tensor to "
                          f"the packed {q}: only the load-time `pack` op makes packed weights")
    if isinstance(arr, QuantizedTensor):  # another layout: through float, then MLX's quantizer
        arr = arr.dequantize()
    codes, scales, biases = mx.quantize(arr.astype(dtype), group_size=q.group_size, bits=q.bits)
    if scales.dtype != scale_dtype:
        scales, biases = scales.astype(scale_dtype), biases.astype(scale_dtype)
    return QuantizedTensor(codes, scales, biases, q)


def storage_arrays(name: str, arr: Tensor) -> list[tuple[str, mx.array]]:
    """The arrays a parameter is kept as: itself, or its codes, scales and biases."""
    if isinstance(arr, QuantizedTensor):
        return list(zip(Quant.storage_names(name), (arr.codes, arr.scales, arr.biases)))
    return [(name, arr)]


def from_storage(params: Mapping[str, Value], arrays: Mapping[str, mx.array]) -> dict[str, Tensor]:
    """The inverse of `storage_arrays`: regroup the codes, scales and biases of the quantized ones in `params`."""
    out: dict[str, Tensor] = dict(arrays)
    for name, p in params.items():
        if p.type.quant is not None and name in out:
            codes, scales, biases = Quant.storage_names(name)
            if scales not in out or biases not in out:
                raise WeightError(f"quantized parameter {name} is missing its {scales} / {biases} arrays")
            rows = p.type.shape[0] if p.type.quant.packed else None
            out[name] = QuantizedTensor(out.pop(codes), out.pop(scales), out.pop(biases), p.type.quant, rows)
    return out


def _checked(params: dict, tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    missing = [n for n in params if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightError(f"missing tensor for {what} {missing[0]}{more}")
    unexpected = [n for n in tensors if n not in params]
    if unexpected:
        raise WeightError(f"unexpected tensor {unexpected[0]}: the program has no such parameter")
    out = {}
    for name, p in params.items():
        arr = tensors[name]
        if tuple(arr.shape) != tuple(p.type.shape):
            raise WeightError(f"tensor {name} has shape {list(arr.shape)}, the program expects {list(p.type.shape)}")
        out[name] = conform(arr, p.type)
    return out


def stage_parameters(program: Program, stage: str) -> dict[str, Value]:
    """The program's values at a stage (`checkpoint`, `stored` or `runtime`, see `derive.run_derived`) by global
    name."""
    from .derive import stored_parameters

    found = {"checkpoint": program.parameters, "stored": lambda: stored_parameters(program),
             "runtime": program.runtime_parameters}[stage]()
    return dict(found)


def bind(program: Program, tensors: Mapping[str, Tensor], given: str = "checkpoint",
         want: str = "runtime") -> list[tuple[str, mx.array]]:
    """Storage arrays of the program's values at stage `want` (what the generated module holds, or what an artifact
    stores), from tensors at stage `given`: checkpoint parameters, or an artifact's stored tensors. Shapes are
    checked and dtypes conformed on the way in and out."""
    from .derive import run_derived

    have = _checked(stage_parameters(program, given), tensors, f"{given} parameter" if given != "checkpoint"
                    else "parameter")
    values = have if want == given else run_derived(program, have, given, want)
    out = []
    for name, arr in _checked(stage_parameters(program, want), values, f"{want} parameter").items():
        out += storage_arrays(name, arr)
    return out


def random_weights(program: Program, seed: int = 0, scale: float = 0.02) -> dict[str, mx.array]:
    """Seeded random parameters: normal(0, scale) matrices, unit norm weights, zero biases."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in program.parameters():
        shape = tuple(p.type.shape)
        if name.endswith(".bias") or ".lora_B." in name:  # LoRA starts as the identity update, as PEFT does
            a = np.zeros(shape, np.float32)
        elif len(shape) == 1:
            a = np.ones(shape, np.float32)
        else:
            a = rng.normal(0.0, scale, size=shape).astype(np.float32)
        out[name] = mx.array(a)
    return out


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # Linux's madvise advice values


def in_huge_pages(arrays: list[tuple[str, mx.array]]) -> list[tuple[str, mx.array]]:
    """The arrays (evaluated here, one at a time) copied into buffers that Linux backs with 2 MiB pages
    (transparent huge pages) and returned as views of them; elsewhere, or where the kernel declines, as they are.
    The given list is emptied as it is copied, so that each original can go as soon as its copy is made: buffers of
    at most _ARENA_BYTES, filled one after another, and MLX's buffer cache off meanwhile, so that what a copy frees
    goes back to the system before the next buffer is taken (SmolLM2's peak resident memory at load: 318 -> 294 MB).

    A decode step streams every weight once per token. Spread over 4 KiB pages, SmolLM2-135M's 98 MB are ~24k TLB
    misses per token, and the hardware prefetcher stops at every page boundary; huge-page buffers avoid both
    (its tied 28 MB LM head alone went from 1.7 to 1.1 ms per token here)."""
    import sys

    if sys.platform != "linux" or not arrays:
        return arrays
    out, group, size = [], [], 0
    previous = mx.set_cache_limit(0)
    try:
        while arrays:
            nbytes = arrays[0][1].nbytes
            if group and size + nbytes > _ARENA_BYTES:
                out += _huge_page_buffer(group)
                release_free_memory()  # the originals just copied (glibc would keep their pages for reuse)
                group, size = [], 0
            group.append(arrays.pop(0))
            size += nbytes
        return out + _huge_page_buffer(group)
    finally:
        mx.set_cache_limit(previous)


_ARENA_BYTES = 64 << 20  # small enough to free the originals as the copies grow (and below MLX's 32-bit dimensions)


def _huge_page_buffer(arrays: list[tuple[str, mx.array]]) -> list[tuple[str, mx.array]]:
    """in_huge_pages for arrays that fit one buffer (at most _ARENA_BYTES, or one larger array)."""
    import ctypes

    offsets, copies, first, at = [], [], {}, 0  # an array bound under two names (tied weights) is copied once
    for i, (_, a) in enumerate(arrays):
        j = first.setdefault(id(a), i)
        copies.append(j == i)
        offsets.append(at if j == i else offsets[j])
        at += -(-a.nbytes // 64) * 64 if j == i else 0  # every view starts on a cache line
    if at >= 1 << 31:  # one array past MLX's 32-bit dimensions stays where it is
        return arrays
    arena = mx.zeros((at,), mx.uint8)
    mx.eval(arena)
    dst = np.frombuffer(memoryview(arena), dtype=np.uint8)  # writable: MLX's buffer, before any reader sees it
    start = dst.ctypes.data
    lo, hi = -(-start // _HUGE_PAGE) * _HUGE_PAGE, (start + at) // _HUGE_PAGE * _HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = ctypes.c_size_t(max(hi - lo, 0))
        if hi <= lo or libc.madvise(ctypes.c_void_p(lo), size, _MADV_HUGEPAGE) != 0:
            return arrays  # too small, or no transparent huge pages here
        libc.madvise(ctypes.c_void_p(lo), size, _MADV_COLLAPSE)  # now (Linux >= 6.1), else khugepaged does it later
    except (OSError, AttributeError):
        return arrays
    views = []
    for o, copy in zip(offsets, copies):
        name, a = arrays.pop(0)
        if copy and a.nbytes:
            dst[o : o + a.nbytes] = np.frombuffer(memoryview(a.reshape(-1).view(mx.uint8)), dtype=np.uint8)
        views.append((name, arena[o : o + a.nbytes].view(a.dtype).reshape(a.shape)))
        del a
    mx.eval([v for _, v in views])
    return views
