"""Reference implementations in numpy for tests: MLX's affine group quantization and bfloat16 rounding.

Written from MLX's documentation of `mx.quantize` (groups of `group_size` along the last axis share a scale and a
bias; codes `round((w - bias) / scale)` clamped to [0, 2^bits - 1]; packed as a little-endian bit stream per row,
read as uint32) and from its CPU kernel for the details the documentation leaves open: the arithmetic is float32,
rounding is to nearest even, and the scale is nudged so that the group's edge value with the larger magnitude is
represented exactly (`scale = edge / round(edge / scale)`, `bias = edge`). tests/test_quantize.py checks that this
reproduces `mx.quantize` bit for bit on random data, so the tests that use it do not trust MLX's quantizer blindly.

Nothing here imports mlx or mlxc.
"""

from __future__ import annotations

import numpy as np


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype` ("float32", "float16", "bfloat16"), returned as float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return bf16_round(x)
    raise ValueError(dtype)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes [..., K] -> uint32 [..., K * bits / 32]: code i of a row occupies bits [i*bits, (i+1)*bits) of
    the row's little-endian bit stream."""
    codes = np.asarray(codes, dtype=np.uint64)
    shifts = np.arange(bits, dtype=np.uint64)
    stream = ((codes[..., None] >> shifts) & 1).astype(np.uint8)  # [..., K, bits], least significant bit first
    stream = stream.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    packed = np.packbits(stream, axis=-1, bitorder="little")  # bytes, first bit of the stream in bit 0
    return np.ascontiguousarray(packed).view("<u4")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack_codes`: uint32 [..., W] -> codes [..., W * 32 / bits]."""
    packed = np.ascontiguousarray(packed, dtype="<u4")
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(*packed.shape[:-1], -1, bits).astype(np.uint32)
    return (stream << np.arange(bits, dtype=np.uint32)).sum(-1).astype(np.uint32)


def affine_quantize(w: np.ndarray, group_size: int, bits: int, dtype: str = "float32"):
    """(packed uint32 codes, scales, biases) of `w` (float32 values exactly representable in `dtype`); scales and
    biases are returned as float32 holding `dtype` values, codes unpacked are available via `unpack_codes`."""
    w = np.asarray(w, dtype=np.float32)
    assert w.shape[-1] % group_size == 0
    g = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    n_bins = np.float32(2**bits - 1)
    w_max, w_min = g.max(-1), g.min(-1)
    use_min = np.abs(w_min) > np.abs(w_max)  # the edge with the larger magnitude is kept exact
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7)).astype(np.float32)
    scale = np.where(use_min, scale, -scale).astype(np.float32)
    edge = np.where(use_min, w_min, w_max).astype(np.float32)
    q0 = np.rint(edge / scale).astype(np.float32)
    nonzero = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(nonzero, edge / q0, scale).astype(np.float32)
    bias = np.where(nonzero, edge, np.float32(0)).astype(np.float32)
    codes = np.rint((g - bias[..., None]) / scale[..., None])
    codes = np.clip(codes, 0, n_bins).astype(np.uint32).reshape(w.shape)
    return pack_codes(codes, bits), round_to(scale, dtype), round_to(bias, dtype)


def affine_dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int,
                      dtype: str = "float32") -> np.ndarray:
    """`scale * code + bias` per group, each operation rounded to `dtype` (the scales' dtype), as float32."""
    codes = unpack_codes(packed, bits).astype(np.float32)
    g = codes.reshape(*codes.shape[:-1], codes.shape[-1] // group_size, group_size)
    prod = round_to(np.asarray(scales, np.float32)[..., None] * g, dtype)
    out = round_to(prod + np.asarray(biases, np.float32)[..., None], dtype)
    return out.reshape(codes.shape)
