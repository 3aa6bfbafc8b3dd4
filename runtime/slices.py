"""A rank's share of a checkpoint: each tensor read whole or as one slice along one axis, and nothing else read.

MLX's lazy `mx.load` reads a whole tensor when it is evaluated and a slice keeps that buffer alive, so a rank of a
tensor-parallel model would hold every weight it slices. `SafetensorsSlices` reads the bytes of a slice straight
from the file instead (the safetensors header gives each tensor's offset): a row range is one read, a column
range is read in blocks of rows and cut. Other sources (a GGUF file, in-memory tensors) are sliced as arrays and
copied out one tensor at a time, and random weights are drawn in the single-process order, keeping only the share.
"""

from __future__ import annotations

import json
import os
import struct
from math import prod
from pathlib import Path
from typing import Callable, Iterable, Mapping

import mlx.core as mx
import numpy as np

from ..ir.errors import MlxcError
from .weights import QuantizedTensor, Tensor

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.bool_}
_BLOCK = 4 << 20  # bytes read at a time for a column slice


def _to_mx(arr: np.ndarray, dtype: str) -> mx.array:
    out = mx.array(arr)
    return out.view(mx.bfloat16) if dtype == "BF16" else out


class SafetensorsSlices:
    """Tensors of safetensors files by name (renamed by the caller), read whole or by slice from the files."""

    def __init__(self, files: Iterable[Path], rename: Callable[[str], str | None] = lambda n: n):
        self.index: dict[str, tuple[Path, str, list[int], int]] = {}  # name -> file, dtype, shape, byte offset
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                try:
                    header = json.loads(fh.read(size))
                except ValueError as e:
                    raise MlxcError(f"{f}: not a safetensors file ({e})") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                new = rename(name)
                if new is None:
                    continue
                if info["dtype"] not in _NUMPY:
                    raise MlxcError(f"{f}: tensor {name} has dtype {info['dtype']}, which mlxc cannot slice")
                self.index[new] = (Path(f), info["dtype"], list(info["shape"]), 8 + size + info["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index[name][2])

    def read(self, name: str, axis: int | None = None, start: int = 0, stop: int = 0) -> mx.array:
        if name not in self.index:
            raise MlxcError(f"missing tensor for parameter {name}")
        path, dtype, shape, offset = self.index[name]
        np_dtype = np.dtype(_NUMPY[dtype])
        if axis is None:
            axis, start, stop = 0, 0, shape[0] if shape else 1
        if not shape:
            return _to_mx(_pread(path, offset, np_dtype.itemsize).view(np_dtype).reshape(()), dtype)
        raw = _read_slice(path, offset, shape, np_dtype.itemsize, axis, start, stop)
        return _to_mx(raw.view(np_dtype).reshape(raw.shape[:-1]), dtype)


def _read_slice(path: Path, offset: int, shape: list[int], itemsize: int, axis: int, start: int,
                stop: int) -> np.ndarray:
    """Entries start .. stop - 1 along `axis` of a row-major array of `itemsize`-byte items at `offset` in a file,
    as uint8 of shape (..., stop - start, ..., itemsize): a range of the first axis is one read, others are read
    in blocks of rows and cut."""
    outer, inner = prod(shape[:axis]), prod(shape[axis + 1:]) * itemsize  # bytes per entry along axis
    row = shape[axis] * inner
    if outer == 1:
        arr = _pread(path, offset + start * inner, (stop - start) * inner)
    else:
        rows_per_read = max(1, _BLOCK // row)
        parts = []
        for first in range(0, outer, rows_per_read):
            n = min(rows_per_read, outer - first)
            block = _pread(path, offset + first * row, n * row).reshape(n, row)
            parts.append(block[:, start * inner:stop * inner].copy())
        arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return arr.reshape(list(shape[:axis]) + [stop - start] + list(shape[axis + 1:]) + [itemsize])


def _pread(path: Path, offset: int, length: int) -> np.ndarray:
    """`length` bytes of a file from `offset`, as uint8."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise MlxcError(f"{path}: file ends inside a tensor (truncated checkpoint?)")
            done += got
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=np.uint8)


class GGUFSlices:
    """Tensors of a GGUF file by name, read whole or by slice from the file: rows of a block-quantized matrix are
    byte ranges, columns whole blocks of each row. Q4_0, Q4_1, Q8_0, Q4_K and Q6_K (those in `native`) come as
    affine codes, scales and biases (`_affine_blocks`), other quantized types dequantized to float32, F16 and BF16
    as stored: the tensors `api.read_gguf_source` gives, one slice at a time.

    `tensors`: name -> (GGML type name, shape in numpy order, absolute byte offset); `native`: name -> the Quant of
    the types kept quantized."""

    def __init__(self, path: Path, tensors: Mapping[str, tuple[str, tuple[int, ...], int]],
                 native: Mapping[str, object]):
        self.path, self.tensors, self.native = Path(path), dict(tensors), dict(native)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, axis: int | None = None, start: int = 0, stop: int = 0) -> Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if name not in self.tensors:
            raise MlxcError(f"missing tensor for parameter {name}")
        kind, shape, offset = self.tensors[name]
        shape = list(shape)
        if axis is None:
            axis, start, stop = 0, 0, shape[0]
        if kind in _GGUF_FLOAT:
            np_dtype = np.dtype(_GGUF_FLOAT[kind])
            raw = _read_slice(self.path, offset, shape, np_dtype.itemsize, axis, start, stop)
            return _to_mx(raw.view(np_dtype).reshape(raw.shape[:-1]), kind)
        qtype = GGMLQuantizationType[kind]
        block, size = GGML_QUANT_SIZES[qtype]
        last = len(shape) - 1
        blocks = shape[:-1] + [shape[-1] // block]
        if axis == last:  # whole blocks of every row, cut after dequantizing where the range splits a block
            first, end = start // block, -(-stop // block)
            raw = _read_slice(self.path, offset, blocks, size, last, first, end)
            cut = (start - first * block, stop - first * block)
        else:
            raw = _read_slice(self.path, offset, blocks, size, axis, start, stop)
            cut = None
        if name in self.native:
            whole = _affine_blocks(raw, kind, self.native[name])
            if cut is None or (cut[0] == 0 and cut[1] == raw.shape[-2] * block):
                return whole
            # a K-quant super-block (256 values) holds several affine groups: a cut between groups stays exact
            group = self.native[name].group_size
            if cut[0] % group or cut[1] % group:
                raise MlxcError(f"{self.path}: {name} is stored in groups of {group} values, and columns "
                                f"{start}..{stop - 1} split a group")
            return take(whole, last, cut[0], cut[1])
        from gguf.quants import dequantize

        values = dequantize(raw.reshape(raw.shape[:-2] + (-1,)), qtype)
        if cut is not None:
            values = values[..., cut[0]:cut[1]]
        return mx.array(np.ascontiguousarray(values, dtype=np.float32))


_GGUF_FLOAT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _affine_blocks(raw: np.ndarray, kind: str, quant) -> QuantizedTensor:
    """Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K blocks (uint8 of shape (..., blocks, bytes per block)) as MLX's affine
    quantization: a block's scale d, bias -8d (Q4_0), its stored minimum m (Q4_1) or -128d (Q8_0), and codes packed
    into uint32 words low bits first. Q4 blocks hold values j and j + 16 in the low and high nibbles of byte j.
    K-quants: see `_k_blocks`."""
    if kind in ("Q4_K", "Q6_K"):
        return _k_blocks(raw, kind, quant)
    lead = raw.shape[:-2]
    d = raw[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = d * np.float16(-128)
    else:
        qs = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]
        bias = raw[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else d * np.float16(-8)
        nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # 32 values of a block, in order
        codes = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)  # two per byte, low first
    words = np.ascontiguousarray(codes).reshape(lead + (-1,)).view(np.uint32)
    return QuantizedTensor(mx.array(words), mx.array(np.ascontiguousarray(d)), mx.array(np.ascontiguousarray(bias)),
                           quant)


def _k_blocks(raw: np.ndarray, kind: str, quant) -> QuantizedTensor:
    """GGUF K-quant super-blocks of 256 weights as affine groups, with float32 scales and biases (exact: an f16 d
    times a 6- or 8-bit integer fits float32's significand).

    Q4_K (144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of nibbles): 8 groups of
    32, w = d*sc * q - dmin*m, q 4-bit; in each 64-weight chunk the low nibbles of 32 bytes are weights 0..31, the
    high nibbles 32..63. Q6_K (210 bytes: 128 bytes of low nibbles ql, 64 bytes of high 2-bit pairs qh, 16 int8
    scales, f16 d): 16 groups of 16, w = d*sc * (q - 32), q 6-bit, kept as 8-bit codes with bias -32 * scale; in each
    128-weight half, weight 32i + l (i < 4, l < 32) takes nibble i // 2 of ql byte 32 (i % 2) + l and bits 2i, 2i + 1
    of qh byte l."""
    lead, nb = raw.shape[:-2], raw.shape[-2]
    if kind == "Q4_K":
        d, dmin = (raw[..., i:i + 2].copy().view(np.float16)[..., 0].astype(np.float32) for i in (0, 2))
        q = raw[..., 4:16]
        sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
        mn = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
        scales = d[..., None] * sc.astype(np.float32)
        biases = -(dmin[..., None] * mn.astype(np.float32))
        qs = raw[..., 16:144].reshape(lead + (nb, 4, 1, 32))
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(lead + (nb * 256,))
        codes = values[..., 0::2] | (values[..., 1::2] << 4)
    else:
        ql = raw[..., 0:128].reshape(lead + (nb, 2, 1, 2, 32))  # half, nibble, ql byte 32j + l
        qh = raw[..., 128:192].reshape(lead + (nb, 2, 1, 32))
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=-3).reshape(lead + (nb, 2, 4, 32))
        high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        codes = (low | (high << 4)).reshape(lead + (nb * 256,))
        d = raw[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
        scales = d[..., None] * raw[..., 192:208].view(np.int8).astype(np.float32)
        biases = np.float32(-32) * scales
    words = np.ascontiguousarray(codes.astype(np.uint8)).view(np.uint32)
    flat = lambda a: mx.array(np.ascontiguousarray(a.reshape(lead + (-1,)), np.float32))  # noqa: E731
    return QuantizedTensor(mx.array(words), flat(scales), flat(biases), quant)


def take(arr: Tensor, axis: int | None, start: int, stop: int) -> Tensor:
    """A slice of an in-memory (or lazily loaded) tensor, copied into its own buffer so the whole can be freed."""
    if axis is None:
        return arr
    if isinstance(arr, QuantizedTensor):
        last = len(arr.shape) - 1
        if axis < last:
            cut = lambda a: a[(slice(None),) * axis + (slice(start, stop),)]  # noqa: E731
            return QuantizedTensor(_copy(cut(arr.codes)), _copy(cut(arr.scales)), _copy(cut(arr.biases)), arr.quant)
        per, g = 32 // arr.quant.bits, arr.quant.group_size
        return QuantizedTensor(_copy(arr.codes[..., start // per:stop // per]),
                               _copy(arr.scales[..., start // g:stop // g]),
                               _copy(arr.biases[..., start // g:stop // g]), arr.quant)
    return _copy(arr[(slice(None),) * axis + (slice(start, stop),)])


def _copy(a: mx.array) -> mx.array:
    """The values of `a` in a buffer of its own (a slice of a loaded array would keep the whole array alive)."""
    mx.eval(a)
    if a.dtype == mx.bfloat16:
        return mx.array(np.array(a.view(mx.uint16))).view(mx.bfloat16)
    return mx.array(np.array(a))


def random_shares(parameters: Iterable[tuple[str, tuple[int, ...]]], wanted: Mapping[str, list],
                  seed: int = 0, scale: float = 0.02) -> dict[tuple, mx.array]:
    """The seeded random weights a single process draws (`weights.random_weights`: normal(0, scale) matrices, unit
    vectors, zero biases and LoRA B), drawn parameter by parameter in the same order, keeping only the slices in
    `wanted` (checkpoint name -> [(axis, start, stop), ...], axis None for whole): no rank holds more than one whole
    tensor at a time. Returns (name, axis, start, stop) -> array."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in parameters:
        if name.endswith(".bias") or ".lora_B." in name:
            a = np.zeros(shape, np.float32)
        elif len(shape) == 1:
            a = np.ones(shape, np.float32)
        else:
            a = rng.normal(0.0, scale, size=shape).astype(np.float32)
        for axis, start, stop in wanted.get(name, ()):
            part = a if axis is None else a[(slice(None),) * axis + (slice(start, stop),)]
            out[(name, axis, start, stop)] = mx.array(np.ascontiguousarray(part))
        del a
    return out
