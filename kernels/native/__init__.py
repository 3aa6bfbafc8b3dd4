"""Native CPU kernels for MLX's affine quantized layout: a C++ MLX extension (`_mlxc_native`, built by
`pip install` from `kernels/native/`), so the ops are ordinary nodes of MLX's lazy graph and work under `mx.compile`.

    from mlxc.kernels import native
    if native.available():
        y = native.qmatmul(x, codes, scales, biases, bits=4, group_size=32)      # x @ W.T
        e = native.qembed(ids, codes, scales, biases, bits=4, group_size=32)     # W[ids], dequantized
    else:
        print(native.reason())

`pack` (plain MLX ops, once at load: 0.4 s for SmolLM2-135M) puts 16 weight rows side by side, so
`qmatmul_packed`'s integer dot products need no horizontal sums: about 2.4x fewer instructions per weight for one
activation row (2x faster when the weights are in cache; a decode step that streams them from DRAM is bound by
memory either way). `qembed_packed` reads rows of the same packed table. Every ISA has a packed kernel.

The layout is MLX's `mx.quantize` output, which is exactly GGUF Q4_0 / Q4_1 / Q8_0 after mlxc's load (group 32);
groups of 64 and 128 work too. `qmatmul` quantizes activations to int8 per 32-element block (llama.cpp's scheme) for
integer dot products; `int8_activations=False` keeps them in float (exact up to float rounding). Kernels exist for
AVX-512 VNNI, AVX-512 and AVX2 (x86-64), NEON with and without the ARMv8.2 dot product (arm64, verified under qemu:
tests/test_native_arm.py) and portable C++; the best the CPU supports is chosen at run time (`isa()`), and
`MLXC_NATIVE_ISA` or `set_isa` pick another for testing. Calls use `threads()` threads, MLX's CPU stream thread
included (`MLXC_NATIVE_THREADS`, `set_threads`).

Error bound of the int8 path: each activation block b of row m is x ~= d_b * q with d_b = max|x_b| / 127 and
|x - d_b q| <= d_b / 2 elementwise, and the result is exactly W @ (d q) (biases included: they multiply the block
sums of d q, as llama.cpp's Q8_1 blocks do), so
    |y[m, n] - (x @ W.T)[m, n]| <= sum_b (d_b / 2) * sum_{k in b} |W[n, k]|   (+ float32 rounding)
where W is the dequantized weight. Its RMS is that of rounding noise, sum_b d_b^2 / 12 * sum_{k in b} W[n, k]^2:
about 5e-3 of the output's RMS for Gaussian activations.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx  # loads libmlx.so, which the extension links against

_BUILD_LOG = Path(__file__).with_name("_build_error.txt")  # written by setup.py when the build failed


def _load():
    if importlib.util.find_spec(f"{__name__}._mlxc_native") is None:
        if _BUILD_LOG.exists():
            lines = _BUILD_LOG.read_text(errors="replace").strip().splitlines()
            return None, (f"the native extension failed to build at install time: "
                          f"{lines[0] if lines else 'unknown error'} (details in {_BUILD_LOG})")
        return None, ("the native extension is not built; reinstall mlxc (`pip install -e .`, which needs a C++ "
                      "compiler) to build it")
    try:
        ext = importlib.import_module(f"{__name__}._mlxc_native")
    except ImportError as e:
        return None, f"the native extension does not load: {e}"
    if ext.built_with_mlx != mx.__version__:
        return None, (f"the native extension was built against MLX {ext.built_with_mlx} but MLX {mx.__version__} "
                      "is installed; reinstall mlxc to rebuild it")
    return ext, None


_ext, _reason = _load()


def available() -> bool:
    """Whether the native kernels can run here."""
    return _ext is not None


def reason() -> Optional[str]:
    """Why the native kernels are unavailable (None when they are available)."""
    return _reason


def _need():
    if _ext is None:
        raise RuntimeError(f"mlxc native kernels are unavailable: {_reason}")
    return _ext


def qmatmul(x: mx.array, codes: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int,
            int8_activations: bool = True, act_terms: int = 1, stream=None) -> mx.array:
    """`x @ W.T` for W (N x K) in MLX's affine layout: codes uint32 [N, K*bits/32], scales and biases
    [N, K/group_size] (float32, float16 or bfloat16). x: [..., K] in float32, float16 or bfloat16; the result is
    [..., N] in x's dtype. Same arguments as `mx.quantized_matmul(x, codes, scales, biases, transpose=True, ...)`.
    `act_terms=2` quantizes activations twice (x ~= d1 q1 + d2 q2, the second pass the first's residual): the error
    bound shrinks by ~254x, for twice the integer dot products."""
    return _need().qmatmul(x, codes, scales, biases, bits=bits, group_size=group_size,
                           int8_activations=int8_activations, act_terms=act_terms, stream=stream)


def pack(codes: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int
         ) -> tuple[mx.array, mx.array, mx.array]:
    """W (MLX's affine layout) repacked for `qmatmul_packed`: 16 rows side by side, so each 32-bit lane of the
    kernel's vectors is one weight row. Plain MLX ops (lazy, so a load-time `derive` can hold them); exact (codes,
    scales and biases are moved, not recomputed). Returns (pcodes, pscales, pbiases):
      pcodes  uint8 [T, K/32 * 256] (4-bit) or [T, K/32 * 512] (8-bit), T = ceil(N / 16): per tile and 32-block,
              4-bit: 4 vectors of 64 bytes, byte 4r + i = code 4j + i of row r | code 16 + 4j + i << 4;
              8-bit: 8 vectors, byte 4r + i = code 4j + i of row r;
      pscales, pbiases  [T, K/group_size * 16], the rows' scales (biases) per group, 16 rows side by side;
    rows past N are zero. Memory: the same as the MLX layout (4-bit) plus padding to 16 rows."""
    if bits not in (4, 8) or group_size not in (32, 64, 128) and (bits, group_size) != (8, 16):
        raise ValueError(f"pack: bits must be 4 or 8 and group_size 32, 64 or 128 (or 16 with 8 bits: GGUF Q6_K), "
                         f"got {bits}, {group_size}")
    n, k = codes.shape[0], codes.shape[1] * 32 // bits
    nb, groups, tiles = k // 32, k // group_size, -(-n // 16)
    b8 = codes.view(mx.uint8)  # little-endian: the codes' bytes in order
    c = mx.stack([b8 & 15, b8 >> 4], axis=-1).reshape(n, k) if bits == 4 else b8
    pad = tiles * 16 - n
    if pad:
        c = mx.concatenate([c, mx.zeros((pad, k), mx.uint8)])
        scales = mx.concatenate([scales, mx.zeros((pad, groups), scales.dtype)])
        biases = mx.concatenate([biases, mx.zeros((pad, groups), biases.dtype)])
    c = c.reshape(tiles, 16, nb, 8, 4).transpose(0, 2, 3, 1, 4)  # tile, block, quad, row, byte
    if bits == 4:
        c = c[:, :, :4] | (c[:, :, 4:] << 4)
    side = lambda a: a.reshape(tiles, 16, groups).transpose(0, 2, 1).reshape(tiles, groups * 16)  # noqa: E731
    return c.reshape(tiles, -1), side(scales), side(biases)


def unpack(pcodes: mx.array, pscales: mx.array, pbiases: mx.array, *, n: int, bits: int, group_size: int
           ) -> tuple[mx.array, mx.array, mx.array]:
    """The inverse of `pack` (plain MLX ops, exact): W's codes, scales and biases in MLX's layout, n rows. For the
    fallback where packed weights meet a machine without the extension."""
    if bits not in (4, 8) or group_size not in (32, 64, 128) and (bits, group_size) != (8, 16):
        raise ValueError(f"unpack: bits must be 4 or 8 and group_size 32, 64 or 128 (or 16 with 8 bits: GGUF Q6_K), "
                         f"got {bits}, {group_size}")
    tiles = pcodes.shape[0]
    nb = pcodes.shape[1] // (256 if bits == 4 else 512)
    k, groups = nb * 32, nb * 32 // group_size
    c = pcodes.reshape(tiles, nb, 4 if bits == 4 else 8, 16, 4)
    if bits == 4:
        c = mx.concatenate([c & 15, c >> 4], axis=2)  # quads 0-3 low nibbles, 4-7 high
    c = c.transpose(0, 3, 1, 2, 4).reshape(tiles * 16, k)[:n]  # tile, row, block, quad, byte
    if bits == 4:
        c = c[:, 0::2] | (c[:, 1::2] << 4)
    codes = mx.contiguous(c).view(mx.uint32)
    rows = lambda a: a.reshape(tiles, groups, 16).transpose(0, 2, 1).reshape(tiles * 16, groups)[:n]  # noqa: E731
    return codes, rows(pscales), rows(pbiases)


def qmatmul_packed(x: mx.array, pcodes: mx.array, pscales: mx.array, pbiases: mx.array, *, bits: int,
                   group_size: int, n: int, act_terms: int = 1, stream=None) -> mx.array:
    """`qmatmul` (int8 activations) on weights from `pack`; n is W's row count. Scales float32 or float16. Equal to
    `qmatmul` up to float summation order: the same integer dot products, so the same error bound."""
    return _need().qmatmul_packed(x, pcodes, pscales, pbiases, bits=bits, group_size=group_size, n=n,
                                  act_terms=act_terms, stream=stream)


def qembed_packed(ids: mx.array, pcodes: mx.array, pscales: mx.array, pbiases: mx.array, *, bits: int,
                  group_size: int, n: int, dtype: Optional[mx.Dtype] = None, stream=None) -> mx.array:
    """`qembed` on a table from `pack` (n rows), so a tied embedding and LM head can share one packed copy. Portable
    code: runs wherever the extension does."""
    return _need().qembed_packed(ids, pcodes, pscales, pbiases, bits=bits, group_size=group_size, n=n, dtype=dtype,
                                 stream=stream)


def qembed(ids: mx.array, codes: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int,
           dtype: Optional[mx.Dtype] = None, stream=None) -> mx.array:
    """Rows `ids` of W, dequantized: `mx.dequantize(codes[ids], scales[ids], biases[ids], ...)` in one op; the result
    has shape ids.shape + (K,) and `dtype` (default: the scales' dtype). Negative ids count from the end; ids out of
    range are clamped."""
    return _need().qembed(ids, codes, scales, biases, bits=bits, group_size=group_size, dtype=dtype, stream=stream)


def linear(x: mx.array, w: mx.array, bias: Optional[mx.array] = None, *, stream=None) -> mx.array:
    """`x @ w.T (+ bias)`, w [N, K] float: a decode step reads each weight once; MLX's CPU matmul uses sgemm."""
    return _need().linear(x, w, bias, stream=stream)


def rms_norm(x: mx.array, w: mx.array, eps: float, *, stream=None) -> mx.array:
    """`mx.fast.rms_norm(x, w, eps)` as one primitive (float32 inside; the result in x's dtype)."""
    return _need().rms_norm(x, w, eps, stream=stream)


def rope(x: mx.array, dims: int, *, traditional: bool, freqs: mx.array, offset, stream=None) -> mx.array:
    """`mx.fast.rope(x, dims, traditional=..., base=None, scale=1.0, offset=offset, freqs=freqs)` for x
    [B, H, T, D] as one primitive; offset an int or a one-element integer array."""
    return _need().rope(x, dims, traditional=traditional, freqs=freqs, offset=offset, stream=stream)


def attention_decode(q: mx.array, k: mx.array, v: mx.array, *, scale: float, window: int = 0,
                     stream=None) -> mx.array:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)` for one query per head, q [B, Hq, 1, D] over
    k, v [B, Hkv, S, D] (any strides: a KV cache's buffers in place; grouped-query heads by index), the last
    `window` keys only when window > 0. Float32 accumulation, softmax probabilities rounded to the inputs' dtype."""
    return _need().attention_decode(q, k, v, scale=scale, window=window, stream=stream)


def attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, window: int = 0, stream=None) -> mx.array:
    """Causal `mx.fast.scaled_dot_product_attention` for q [B, Hq, T, D] at the last T of the S positions of k, v
    [B, Hkv, S, D] (any strides; grouped-query heads by index), each query over its last `window` keys when
    window > 0; T == 1 runs `attention_decode`'s kernel. Float32 softmax; differentiable (MLX's composition)."""
    return _need().attention(q, k, v, scale=scale, window=window, stream=stream)


def attention_qkv_decode(qkv: mx.array, k_cache: mx.array, v_cache: mx.array, freqs: mx.array, *, offset: int,
                         q_heads: int, kv_heads: int, head_dim: int, rope_dims: int, traditional: bool, scale: float,
                         window: int = 0, stream=None) -> tuple[mx.array, mx.array, mx.array]:
    """A decode step's rope, KV-cache writes and attention as one op instead of ~13 (per-op overhead dominates)."""
    return _need().attention_qkv_decode(
        qkv, k_cache, v_cache, freqs, offset=offset, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        rope_dims=rope_dims, traditional=traditional, scale=scale, window=window, stream=stream)


def glu(x: mx.array, *, activation: str, stream=None) -> mx.array:
    """`act(x[..., :n]) * x[..., n:]` (silu, gelu_tanh) as one op: not split, activation, multiply (fewer ops)."""
    return _need().glu(x, activation=activation, stream=stream)


def scan_available() -> bool:
    """Whether `selective_scan` can run here (the extension is built and has it)."""
    return _ext is not None and hasattr(_ext, "selective_scan")


def selective_scan(u: mx.array, delta: mx.array, A: mx.array, B: mx.array, C: mx.array, D: mx.array,
                   dt_bias: mx.array, z: Optional[mx.array] = None, h: Optional[mx.array] = None, *,
                   stream=None) -> tuple[mx.array, mx.array]:
    """Mamba's selective scan as one primitive, every intermediate in float32 (the `selective_scan` op of
    mlxc.ir.ops): dt_t = softplus(delta_t + dt_bias), h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,
    y_t = h_t . C_t + D u_t, times silu(z_t) when z is given. u, delta, z [B, T, Dm]; A [Dm, N] (N <= 256); B, C
    [B, T, N]; D, dt_bias [Dm]; h [B, Dm, N] the state before (zeros when None); float32, float16 or bfloat16, any
    strides. Returns (y [B, T, Dm], final state [B, Dm, N]), both float32. Sequential in time per channel, 16
    channels per vector (exp by a polynomial, ~2e-7 relative), channel groups over `threads()` threads. No gradient
    of its own: the generated code wraps it with the chunked MLX scan's."""
    return tuple(_need().selective_scan(u, delta, A, B, C, D, dt_bias, z=z, h0=h, stream=stream))


def isa() -> Optional[str]:
    """The instruction set whose kernels run ('avx512vnni', 'avx512', 'avx2', 'neon_dotprod', 'neon' or 'scalar');
    None if unavailable."""
    return _ext.isa() if _ext is not None else None


def supported_isas() -> list[str]:
    """Instruction sets this CPU can run, best first."""
    return list(_ext.supported_isas()) if _ext is not None else []


def set_isa(name: str) -> None:
    """Run the kernels of `name` ('auto' for the best); for tests and benchmarks."""
    if not _need().set_isa(name):
        raise ValueError(f"this CPU cannot run the {name!r} kernels; it supports {supported_isas()}")


def act_terms() -> int:
    """How many 8-bit passes the generated code's matmuls quantize activations in (`act_terms` of `qmatmul`):
    MLXC_NATIVE_ACT_TERMS, 1 (llama.cpp's rounding, fastest) or 2 (default: the float path's answers)."""
    value = os.environ.get("MLXC_NATIVE_ACT_TERMS", "2").strip()
    if value not in ("1", "2"):
        raise ValueError(f"MLXC_NATIVE_ACT_TERMS must be 1 or 2, got {value!r}")
    return int(value)


def threads() -> int:
    """Threads one call uses, MLX's CPU stream thread included."""
    return _need().threads()


def set_threads(n: int) -> None:
    """Threads per call (1: the stream thread alone; 0: the default, the CPUs this process may use)."""
    _need().set_threads(n)


def describe() -> str:
    """One line for `mlxc --version` / `inspect`: what runs, or why nothing does."""
    if _ext is None:
        return f"native kernels: unavailable ({_reason})"
    try:
        passes = f"activations in {act_terms()} 8-bit pass{'es' if act_terms() > 1 else ''}"
    except ValueError as e:
        passes = str(e)
    return f"native kernels: active, kernels=auto runs them on the CPU ({_ext.isa()}, {_ext.threads()} threads, {passes})"


__all__ = ["available", "reason", "qmatmul", "qembed", "pack", "unpack", "qmatmul_packed", "qembed_packed", "linear",
           "rms_norm", "rope", "attention", "attention_decode", "attention_qkv_decode", "glu", "act_terms", "isa",
           "supported_isas", "set_isa", "threads", "set_threads", "describe"]
