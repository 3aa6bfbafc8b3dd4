"""`mlxc kernels check`: every kernel across shapes, dtypes and features, run in the emulator and compared with its
reference ops.

Each case draws seeded inputs in the case's dtype, runs the kernel's exact Metal source in the emulator (thread
orders forward and reversed, so races show) and evaluates the reference ops in float32 on the same (rounded) inputs.
The error is max |kernel - reference| / max(1, max |reference|): absolute for values up to 1, relative above, so a
bfloat16 output is judged by its own precision. Tolerances: 1e-4 for float32, 1e-2 for float16 and bfloat16.
Unused cache positions hold NaN, so a kernel that reads outside the keys it was given fails.
"""

from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import mlx.core as mx
import numpy as np

from .emulator import emulator as emu
from .metal import attention, scan, ssd
from .metal.kernel import Launch
from .registry import REGISTRY

TOLERANCE = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 1e-2}
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Case:
    kernel: str  # registry name
    config: str
    dtype: mx.Dtype
    make: Callable[[], tuple[Launch, list[mx.array]]]  # (launch, float32 reference outputs)


@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    error: float | None
    tolerance: float
    verdict: str  # "ok" or "FAIL"
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


# ------------------------------------------------------------------------------------------------ inputs


class _Draw:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape, dtype=mx.float32, scale: float = 1.0) -> mx.array:
        return mx.array((self.rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _f32(*xs):
    return [None if x is None else x.astype(mx.float32) for x in xs]


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


# ------------------------------------------------------------------------------------------------ cases


def _scan_case(dtype, b, L, dm, n, z, h0) -> Case:
    label = f"B{b} L{L} Dm{dm} N{n}" + (" z" if z else "") + (" h0" if h0 else "")

    def make():
        r = _Draw(_seed("scan", label, dtype))
        u, delta = r(b, L, dm, dtype=dtype), r(b, L, dm, dtype=dtype)
        A = -mx.exp(r(dm, n, scale=0.5))
        B, C = r(b, L, n, dtype=dtype), r(b, L, n, dtype=dtype)
        D, bias = r(dm), r(dm, scale=0.5)
        zz = r(b, L, dm, dtype=dtype) if z else None
        st = r(b, dm, n) if h0 else None
        launch = scan.selective_scan_launch(u, delta, A, B, C, D, zz, bias, st)
        u32, d32, B32, C32, z32 = _f32(u, delta, B, C, zz)
        return launch, list(scan.selective_scan_reference(u32, d32, A, B32, C32, D, z32, bias, st))

    return Case("selective_scan", label, dtype, make)


def _step_case(dtype, b, dm, n, z, state_dtype=mx.float32) -> Case:
    label = f"B{b} Dm{dm} N{n}" + (" z" if z else "") + (f" state {DTYPE_NAMES[state_dtype]}"
                                                          if state_dtype != mx.float32 else "")

    def make():
        r = _Draw(_seed("step", label, dtype))
        u, delta = r(b, dm, dtype=dtype), r(b, dm, dtype=dtype)
        A = -mx.exp(r(dm, n, scale=0.5))
        B, C = r(b, n, dtype=dtype), r(b, n, dtype=dtype)
        D, bias = r(dm), r(dm, scale=0.5)
        zz = r(b, dm, dtype=dtype) if z else None
        st = r(b, dm, n, dtype=state_dtype)
        launch = scan.selective_state_update_launch(u, delta, A, B, C, D, st, zz, bias)
        u32, d32, B32, C32, z32, s32 = _f32(u, delta, B, C, zz, st)
        return launch, list(scan.selective_state_update_reference(u32, d32, A, B32, C32, D, s32, z32, bias))

    return Case("selective_state_update", label, dtype, make)


def _m2_step_case(dtype, b, h, g, p, n, limit) -> Case:
    label = f"B{b} H{h} G{g} P{p} N{n}" + (" dt_limit" if limit else "")

    def make():
        r = _Draw(_seed("m2step", label, dtype))
        x, dt = r(b, h, p, dtype=dtype), r(b, h, dtype=dtype)
        A = -mx.exp(r(h, scale=0.5))
        B, C = r(b, g, n, dtype=dtype), r(b, g, n, dtype=dtype)
        D, bias = r(h), r(h, scale=0.5)
        st = r(b, h, p, n)
        lim = (0.05, 1.5) if limit else None
        launch = ssd.mamba2_state_update_launch(x, dt, A, B, C, D, st, bias, lim)
        x32, dt32, B32, C32 = _f32(x, dt, B, C)
        return launch, list(ssd.mamba2_state_update_reference(x32, dt32, A, B32, C32, D, st, bias, lim))

    return Case("mamba2_state_update", label, dtype, make)


def _m2_chunk_case(dtype, b, L, h, g, p, n, limit, h0) -> Case:
    q, pt = ssd.chunk_tiles(n, p)
    label = f"B{b} L{L} H{h} G{g} P{p} N{n}" + (" dt_limit" if limit else "") + (" h0" if h0 else "") + \
        f" (chunk {q}, P tile {pt})"

    def make():
        r = _Draw(_seed("m2chunk", label, dtype))
        x, dt = r(b, L, h, p, dtype=dtype), r(b, L, h, dtype=dtype)
        A = -mx.exp(r(h, scale=0.5))
        B, C = r(b, L, g, n, dtype=dtype, scale=0.5), r(b, L, g, n, dtype=dtype, scale=0.5)
        D, bias = r(h), r(h, scale=0.5)
        st = r(b, h, p, n) if h0 else None
        lim = (0.05, 1.5) if limit else None
        launch = ssd.mamba2_chunk_scan_launch(x, dt, A, B, C, D, bias, lim, st)
        x32, dt32, B32, C32 = _f32(x, dt, B, C)
        return launch, list(ssd.mamba2_chunk_scan_reference(x32, dt32, A, B32, C32, D, bias, lim, st, chunk=8))

    return Case("mamba2_chunk_scan", label, dtype, make)


def _attn_case(kernel, dtype, b, hq, hkv, t, d, cap, start, kv_len, window, softcap) -> Case:
    label = f"B{b} Hq{hq}/Hkv{hkv} T{t} D{d} keys {kv_len} at {start} of {cap}" + \
        (f" window {window}" if window else "") + (f" softcap {softcap:g}" if softcap else "")

    def make():
        r = _Draw(_seed(kernel, label, dtype))
        q = r(b, hq, t, d, dtype=dtype)
        nan = mx.full((b, hkv, cap, d), mx.nan, dtype=dtype)
        keep = (mx.arange(cap) >= start) & (mx.arange(cap) < start + kv_len)
        keep = keep[None, None, :, None]
        k = mx.where(keep, r(b, hkv, cap, d, dtype=dtype), nan)
        v = mx.where(keep, r(b, hkv, cap, d, dtype=dtype), nan)
        scale = d ** -0.5
        make_launch = attention.attention_decode_launch if kernel == "attention_decode" else \
            attention.attention_prefill_launch
        launch = make_launch(q, k, v, scale, window, softcap, start, kv_len)
        q32, k32, v32 = _f32(q, k, v)
        ref = attention.attention_reference(q32, k32, v32, scale, window, softcap, start, kv_len)
        return launch, [ref]

    return Case(kernel, label, dtype, make)


def all_cases() -> list[Case]:
    """float32 gets every configuration; float16 and bfloat16 a representative part (the dtype only changes loads,
    stores and the template argument)."""
    f32, f16, bf16 = mx.float32, mx.float16, mx.bfloat16
    cases: list[Case] = []
    for dtype, configs in ((f32, [(2, 7, 6, 16, True, False), (1, 5, 5, 8, False, True), (1, 3, 3, 64, True, True),
                                  (1, 4, 4, 24, False, False)]),
                           (f16, [(2, 7, 6, 16, True, False), (1, 3, 3, 64, True, True)]),
                           (bf16, [(1, 5, 5, 8, False, True), (1, 3, 3, 64, True, True)])):
        cases += [_scan_case(dtype, *c) for c in configs]
    for dtype, configs in ((f32, [(2, 6, 16, True), (1, 5, 64, False), (1, 3, 8, True, mx.float16)]),
                           (f16, [(2, 6, 16, True)]), (bf16, [(1, 5, 64, False)])):
        cases += [_step_case(dtype, *c) for c in configs]
    for dtype, configs in ((f32, [(2, 4, 2, 8, 16, True), (1, 2, 1, 6, 64, False), (1, 2, 2, 4, 24, False)]),
                           (f16, [(2, 4, 2, 8, 16, True)]), (bf16, [(1, 2, 1, 6, 64, False)])):
        cases += [_m2_step_case(dtype, *c) for c in configs]
    for dtype, configs in ((f32, [(1, 7, 4, 2, 8, 16, True, False), (2, 40, 2, 1, 6, 8, False, True),
                                  (1, 20, 2, 2, 20, 64, False, True), (1, 19, 1, 1, 4, 128, True, True)]),
                           (f16, [(1, 7, 4, 2, 8, 16, True, False)]), (bf16, [(2, 40, 2, 1, 6, 8, False, True)])):
        cases += [_m2_chunk_case(dtype, *c) for c in configs]
    decode = [(1, 4, 2, 1, 64, 40, 3, 21, None, None), (2, 2, 1, 1, 80, 20, 0, 17, 5, 30.0),
              (1, 8, 2, 1, 128, 24, 5, 19, 7, None), (1, 3, 3, 1, 32, 9, 0, 1, None, 20.0)]
    for dtype, configs in ((f32, decode), (f16, decode[:2]), (bf16, decode[1:3])):
        cases += [_attn_case("attention_decode", dtype, *c) for c in configs]
    prefill = [(1, 4, 1, 13, 64, 40, 2, 30, None, 50.0), (1, 2, 2, 9, 32, 16, 0, 9, 4, None),
               (2, 3, 1, 5, 16, 12, 1, 11, 3, 20.0), (1, 4, 2, 17, 128, 24, 0, 17, 6, None),
               (1, 2, 1, 3, 80, 8, 5, 3, None, None), (1, 2, 1, 20, 64, 80, 10, 70, None, None),
               (1, 2, 2, 6, 128, 48, 0, 40, 20, 30.0)]
    for dtype, configs in ((f32, prefill), (f16, prefill[:2] + prefill[5:6]), (bf16, prefill[2:4] + prefill[6:])):
        cases += [_attn_case("attention_prefill", dtype, *c) for c in configs]
    return cases


# ------------------------------------------------------------------------------------------------ running


def _error(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(outs, refs):
        if a.shape != b.shape:
            return float("inf")
        diff = np.abs(a - b)
        if not np.all(np.isfinite(a)):
            return float("inf")
        worst = max(worst, float(diff.max(initial=0.0)) / max(1.0, float(np.abs(b).max(initial=0.0))))
    return worst


def run_checks(only: Iterable[str] | None = None, dtypes: Iterable[str] | None = None, runs: int = 2,
               jobs: int | None = None, progress: Callable[[str], None] | None = None,
               cases: Sequence[Case] | None = None) -> list[Row]:
    """Run every case (or those of the kernels in `only`, of the dtypes in `dtypes`) and return one row each."""
    only = set(only or ())
    unknown = only - set(REGISTRY)
    if unknown:
        from ..ir.errors import MlxcError

        raise MlxcError(f"unknown kernel(s) {', '.join(sorted(unknown))}; kernels: {', '.join(REGISTRY)}")
    wanted = set(dtypes or ())
    selected = [c for c in (cases if cases is not None else all_cases())
                if (not only or c.kernel in only) and (not wanted or DTYPE_NAMES[c.dtype] in wanted)]
    prepared = []
    for c in selected:  # MLX work stays on this thread; the pool only compiles and runs the emulator
        kdef = REGISTRY[c.kernel].kernel
        launch, refs = c.make()
        try:
            src = kdef.metal_source(launch)
        except ValueError as e:
            prepared.append((c, None, None, None, str(e)))
            continue
        host = emu.host_inputs(launch.inputs)
        refs_np = [np.array(r.astype(mx.float32)) for r in refs]
        prepared.append((c, src, launch, host, refs_np))

    def work(item):
        c, src, launch, host, refs = item
        t0 = time.perf_counter()
        if src is None:
            return Row(c.kernel, c.config, DTYPE_NAMES[c.dtype], None, TOLERANCE[c.dtype], "FAIL", refs)
        outs, findings = emu.execute(src, host, launch.output_shapes, launch.output_dtypes, launch.grid,
                                     launch.threadgroup, launch.init_value, runs=runs)
        tol = max(TOLERANCE[d] for d in (c.dtype, *launch.output_dtypes))
        if findings:
            detail = "; ".join(str(f) for f in findings)
            row = Row(c.kernel, c.config, DTYPE_NAMES[c.dtype], None, tol, "FAIL", detail)
        else:
            err = _error([emu.to_float32(o, d) for o, d in zip(outs, launch.output_dtypes)], refs)
            row = Row(c.kernel, c.config, DTYPE_NAMES[c.dtype], err, tol, "ok" if err <= tol else "FAIL",
                      "" if err <= tol else f"max error {err:.3g} above {tol:g}")
        row.seconds = time.perf_counter() - t0
        if progress:
            progress(f"{row.kernel} [{row.dtype}] {row.config}: {row.verdict}")
        return row

    jobs = jobs or min(2, os.cpu_count() or 1)
    if jobs <= 1:
        return [work(p) for p in prepared]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(work, prepared))
