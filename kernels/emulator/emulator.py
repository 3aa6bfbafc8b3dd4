"""Run the exact Metal source MLX generates on this CPU, with GPU semantics, and report what a GPU gets wrong silently.

The source (kernels/metal/source.py, byte-identical to MLX's) is compiled by g++ against `metal.h` (Metal's types and
built-ins, MLX's utilities) together with a generated launcher, and linked with `runtime.cpp`: one threadgroup at a
time, every GPU thread a fiber, a barrier releasing only when every live thread of the group reached it, SIMD
functions exchanging values among the 32 lanes of a SIMD-group. Builds are cached by source hash under
`$MLXC_CACHE_DIR` (default ~/.cache/mlxc)/emulator. Each launch runs in a child process, so a kernel that crashes
cannot take the caller with it.

Every launch runs the grid more than once (threads and threadgroups forward, then reversed; `runs=3` adds a seeded
shuffle), each time with outputs, threadgroup memory and undefined SIMD results filled with a different garbage
pattern. Findings (`EmulatorError.kind`):

- `barrier-divergence`: threads of one group wait at different `threadgroup_barrier` calls;
- `simd-divergence`: lanes of one SIMD-group wait at different SIMD calls, or some at a SIMD call and some at a
  barrier;
- `deadlock`: threads wait at a barrier others will never reach (they returned), or no progress for `timeout` s;
- `race`: outputs differ between thread orders (a missing barrier, a read of uninitialised threadgroup memory, two
  threads writing one element, a shuffle from an inactive lane);
- `unwritten-output`: output elements no thread wrote in any run (a grid given in threadgroups instead of threads,
  a wrong index);
- `out-of-bounds-write` / `out-of-bounds-read`: guard bytes around every buffer changed, or a guard page was hit;
- `threadgroup-memory`: more than 32 KiB of threadgroup memory; `threadgroup-size`: more than 1,024 threads;
- `compile`, `crash`, `stack-overflow`, `mlx-signature-bug` (MLX's early-closed signature, see source.py).

What Metal leaves unspecified, or what could not be settled without a Mac, is decided in `Choices` and nowhere else.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..metal.source import MetalSource

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Choices:
    """Decisions the emulator makes where Metal's behaviour is unspecified or unmeasured here (no Mac). One place.

    partial_threadgroups: MLX dispatches `dispatch_threads(grid, min(threadgroup, grid))`, so threadgroups at the
        grid's edge hold fewer threads. "actual": `threads_per_threadgroup` reports the edge group's real size and
        threads are numbered (thread_index_in_threadgroup, SIMD lanes) densely over it. "dispatched": it reports the
        requested size and numbering keeps the holes (missing threads are inactive lanes). Kernels that are correct
        never depend on it: size the grid to whole threadgroups or ignore those attributes at the edge.
    shuffle_edge: what `simd_shuffle_down/up` (and quad versions) return when lane ± delta leaves the SIMD-group:
        "own" (the caller's value, as Apple's documentation describes: upper lanes are left unchanged) or "poison".
        A source lane that exists but is inactive (returned, or absent in a partial SIMD-group) always gives poison,
        as does `simd_shuffle`/`simd_broadcast` from such a lane.
    exited_at_barrier: threads that returned while others wait at a barrier. Metal requires every thread of a group
        to reach each barrier; "deadlock" reports it, "release" lets the barrier complete with the live threads.
    threadgroup_memory_limit / max_threads_per_threadgroup: Apple GPU limits (32 KiB, 1,024).
    """

    partial_threadgroups: str = "actual"
    shuffle_edge: str = "own"
    exited_at_barrier: str = "deadlock"
    threadgroup_memory_limit: int = 32768
    max_threads_per_threadgroup: int = 1024

    def __post_init__(self):
        if self.partial_threadgroups not in ("actual", "dispatched"):
            raise ValueError(f"partial_threadgroups must be 'actual' or 'dispatched', "
                             f"not {self.partial_threadgroups!r}")
        if self.shuffle_edge not in ("own", "poison"):
            raise ValueError(f"shuffle_edge must be 'own' or 'poison', not {self.shuffle_edge!r}")
        if self.exited_at_barrier not in ("deadlock", "release"):
            raise ValueError(f"exited_at_barrier must be 'deadlock' or 'release', not {self.exited_at_barrier!r}")


DEFAULT_CHOICES = Choices()


@dataclass(frozen=True)
class Finding:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class EmulatorError(Exception):
    """A kernel the emulator refuses, with every finding; `kind` is the first one's."""

    def __init__(self, findings: Sequence[Finding], kernel: str = ""):
        self.findings = list(findings)
        self.kind = self.findings[0].kind if self.findings else "error"
        self.kernel = kernel
        head = f"{kernel}: " if kernel else ""
        super().__init__(head + "; ".join(str(f) for f in self.findings))


@dataclass
class EmulatorResult:
    outputs: list[mx.array]
    findings: list[Finding] = field(default_factory=list)
    runs: int = 0


# ------------------------------------------------------------------------------------------------ building

_CXX = os.environ.get("MLXC_CXX", "g++")
_KERNEL_FLAGS = ["-std=c++20", "-O1", "-fsingle-precision-constant", "-ffp-contract=off", "-fno-strict-aliasing",
                 "-w"]
_RUNTIME_FLAGS = ["-std=c++17", "-O2", "-w"]


def cache_dir() -> Path:
    root = Path(os.environ.get("MLXC_CACHE_DIR") or Path.home() / ".cache" / "mlxc")
    d = root / "emulator"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _compile(cmd: list[str], what: str, source_name: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        shown = "; ".join(errors[:4]) or proc.stderr.strip()[-800:]
        raise EmulatorError([Finding("compile", f"{what} does not compile: {shown}")], source_name)


_RUNTIME_LOCK = threading.Lock()


def _runtime_object() -> Path:
    src = (HERE / "runtime.cpp").read_text() + (HERE / "mlxc_rt.h").read_text()
    out = cache_dir() / f"runtime-{_sha(src, _CXX, *_RUNTIME_FLAGS)}.o"
    with _RUNTIME_LOCK:  # threads of one process build it once; other processes write their own temporary
        if not out.exists():
            tmp = out.with_name(out.name + f".{os.getpid()}-{threading.get_ident()}.o")
            _compile([_CXX, *_RUNTIME_FLAGS, "-I", str(HERE), "-c", str(HERE / "runtime.cpp"), "-o", str(tmp)],
                     "the emulator runtime", "runtime")
            os.replace(tmp, out)
    return out


_TG_DECL = re.compile(
    r"(?<![\w.])threadgroup[ \t]+(?P<type>(?:const[ \t]+)?[A-Za-z_][\w:]*(?:[ \t]*<[^;{}()\n]*?>)?)[ \t]+"
    r"(?P<name>[A-Za-z_]\w*)[ \t]*(?P<dims>(?:\[[^\];\n]*\][ \t]*)*);")
_TG_ANY = re.compile(r"(?<![\w.])threadgroup(?![\w])")
_TG_POINTER = re.compile(r"threadgroup[ \t]+(?:const[ \t]+)?[A-Za-z_][\w:]*(?:[ \t]*<[^;{}()\n]*?>)?[ \t]*[*&]")


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"", re.S)


def _mask_comments(source: str) -> str:
    """The source with comments and string literals blanked (newlines kept), so offsets still match."""
    return _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), source)


def rewrite_threadgroup(source: str) -> str:
    """`threadgroup T name[N];` becomes a reference to per-threadgroup storage (an empty macro would give every
    thread its own copy). Pointers and references into threadgroup memory stay as they are. Lines are kept."""
    masked = _mask_comments(source)
    for m in _TG_ANY.finditer(masked):
        if not _TG_DECL.match(masked, m.start()) and not _TG_POINTER.match(masked, m.start()):
            line = masked.count("\n", 0, m.start()) + 1
            raise EmulatorError([Finding("compile", f"the emulator cannot model the threadgroup declaration at line "
                                                    f"{line} (one `threadgroup T name[...];` per declaration)")])
    out, last = [], 0
    for i, m in enumerate(_TG_DECL.finditer(masked)):
        dims = re.sub(r"\s+", "", m["dims"])
        out.append(source[last:m.start()])
        out.append(f"auto& {m['name']} = mlxc_threadgroup<{m['type']}{' ' + dims if dims else ''}>({i}, __LINE__);")
        last = m.end()
    out.append(source[last:])
    return "".join(out)


def _launcher(src: MetalSource) -> str:
    args = []
    for i, p in enumerate(src.buffers):
        if p.kind == "output":
            t = f"atomic<{p.ctype}>" if src.atomic_outputs else p.ctype
            args.append(f"({t}*)b[{i}]")
        elif p.scalar:
            args.append(f"*(const {p.ctype}*)b[{i}]")
        else:
            args.append(f"(const {p.ctype}*)b[{i}]")
    for p in src.params:
        if p.kind == "attr":
            if p.ctype == "uint3":
                args.append(f"uint3(a->{p.name}[0], a->{p.name}[1], a->{p.name}[2])")
            else:
                args.append(f"a->{p.name}")
    call = src.kernel_name + src.template
    return ('extern "C" void mlxc_kernel_entry(void** b, const MlxcAttrs* a) {\n  ' + call + "(\n    "
            + ",\n    ".join(args) + ");\n}\n")


def translation_unit(src: MetalSource, choices: Choices = DEFAULT_CHOICES) -> str:
    """The C++ the emulator compiles: prelude, MLX's source (threadgroup declarations rewritten, line numbers kept
    through #line), launcher."""
    if src.broken:
        raise EmulatorError([Finding("mlx-signature-bug",
                                     "MLX 0.32.4 closes this kernel's signature after an output too early (several "
                                     "outputs, a shape/strides/ndim buffer and no attribute in the body), so the "
                                     "source does not compile on a Mac either; mention an attribute in the body")],
                            src.kernel_name)
    edge = 1 if choices.shuffle_edge == "poison" else 0
    return (f"#define MLXC_SHUFFLE_EDGE_POISON {edge}\n#include \"metal.h\"\n"
            f"#line 1 \"{src.kernel_name}.metal\"\n{rewrite_threadgroup(src.source)}\n"
            f"#line 1 \"{src.kernel_name}.launcher\"\n{_launcher(src)}")


def build(src: MetalSource, choices: Choices = DEFAULT_CHOICES) -> Path:
    """The emulator executable for this source, compiled once per distinct translation unit."""
    tu = translation_unit(src, choices)
    prelude = (HERE / "metal.h").read_text() + (HERE / "mlxc_rt.h").read_text()
    runtime = _runtime_object()
    key = _sha(tu, prelude, runtime.name, _CXX, *_KERNEL_FLAGS)
    exe = cache_dir() / f"k-{key}"
    if exe.exists():
        return exe
    with tempfile.TemporaryDirectory(dir=cache_dir()) as d:
        cpp = Path(d) / f"{src.kernel_name[:80]}.cpp"
        cpp.write_text(tu)
        obj = Path(d) / "kernel.o"
        _compile([_CXX, *_KERNEL_FLAGS, "-I", str(HERE), "-c", str(cpp), "-o", str(obj)], "the kernel",
                 src.kernel_name)
        tmp = Path(d) / "kernel"
        _compile([_CXX, str(obj), str(runtime), "-o", str(tmp)], "the kernel (link)", src.kernel_name)
        os.replace(tmp, exe)
    return exe


# ------------------------------------------------------------------------------------------------ running

_ORDERS = {"forward": 0, "reverse": 1, "random": 2}
# (thread order, group order, output fill byte, threadgroup-memory fill byte) per run
_RUNS = (("forward", "forward", 0xFF, 0xFF), ("reverse", "reverse", 0xFE, 0x7F), ("random", "random", 0xFD, 0xC3))


def _np(x: Any) -> np.ndarray:
    """A row-contiguous host copy (MLX's ensure_row_contiguous); bfloat16 travels as its uint16 bits."""
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            x = x.view(mx.uint16)
        return np.ascontiguousarray(np.array(x))
    return np.ascontiguousarray(np.asarray(x))


_NP_DTYPES = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.int32: np.int32,
              mx.uint32: np.uint32, mx.int64: np.int64, mx.uint64: np.uint64, mx.int16: np.int16,
              mx.uint16: np.uint16, mx.int8: np.int8, mx.uint8: np.uint8, mx.bool_: np.bool_}


def _to_mx(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def _request(src: MetalSource, inputs: list[np.ndarray], output_shapes, output_dtypes, grid, tg, runs: int,
             init_value, choices: Choices, timeout: int, seed: int) -> bytes:
    parts = [b"MLXCEMU1", struct.pack("<I", len(src.buffers))]

    def buffer(kind: int, name: str, data: bytes, itemsize: int, init: bytes | None = None, nbytes: int = 0):
        n = name.encode()
        parts.append(struct.pack("<IQII", kind, len(data) if kind == 0 else nbytes, itemsize, len(n)) + n)
        if kind == 0:
            parts.append(data)
        else:
            parts.append(struct.pack("<I", 0 if init is None else 1))
            if init is not None:
                parts.append(init)

    for p in src.buffers:
        if p.kind == "input":
            a = inputs[p.index]
            buffer(0, p.name, a.tobytes(), a.itemsize)
        elif p.kind == "shape":
            buffer(0, p.name, np.asarray(inputs[p.index].shape, np.int32).tobytes(), 4)
        elif p.kind == "strides":
            a = inputs[p.index]
            strides = [s // a.itemsize for s in a.strides] if a.ndim else []
            buffer(0, p.name, np.asarray(strides, np.int64).tobytes(), 8)
        elif p.kind == "ndim":
            buffer(0, p.name, np.asarray(inputs[p.index].ndim, np.int32).tobytes(), 4)
        else:
            dt = np.dtype(_NP_DTYPES[output_dtypes[p.index]])
            n = int(np.prod(output_shapes[p.index], dtype=np.int64)) * dt.itemsize
            init = None
            if init_value is not None:
                init = _np(mx.array(init_value, dtype=output_dtypes[p.index])).tobytes()
            buffer(1, p.name, b"", dt.itemsize, init, n)
    parts.append(struct.pack("<3I", *grid) + struct.pack("<3I", *tg))
    parts.append(struct.pack("<I", runs))
    for r in range(runs):
        t, g, fill, tgfill = _RUNS[r]
        parts.append(struct.pack("<IIQBB", _ORDERS[t], _ORDERS[g], seed + r, fill, tgfill))
    parts.append(struct.pack("<5I", 1 if choices.exited_at_barrier == "release" else 0,
                             1 if choices.partial_threadgroups == "dispatched" else 0,
                             choices.threadgroup_memory_limit, timeout, 64))
    return b"".join(parts)


def _index(shape: tuple[int, ...], flat: int) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]" if shape else "[]"


def _compare_runs(src: MetalSource, outs: list[list[np.ndarray]], output_shapes, init_value) -> list[Finding]:
    findings = []
    names = [p.name for p in src.params if p.kind == "output"]
    for o, name in enumerate(names):
        shape = tuple(output_shapes[o])
        base = outs[0][o].reshape(-1)
        raw = [r[o].reshape(-1).view(np.dtype(f"u{r[o].itemsize}")) for r in outs]
        if init_value is None and len(outs) > 1:
            unwritten = np.ones(base.shape, bool)
            for r, bits in enumerate(raw):
                fill = int.from_bytes(bytes([_RUNS[r][2]]) * outs[r][o].itemsize, "little")
                unwritten &= bits == fill
            if unwritten.any():
                n, first = int(unwritten.sum()), int(np.argmax(unwritten))
                findings.append(Finding(
                    "unwritten-output",
                    f"{n} of {base.size} elements of output '{name}' were never written (first {_index(shape, first)});"
                    f" MLX's grid counts threads, not threadgroups: was it given in threadgroups, or an index wrong?"))
        else:
            unwritten = np.zeros(base.shape, bool)
        for r in range(1, len(outs)):
            diff = (raw[r] != raw[0]) & ~unwritten
            if diff.any():
                first = int(np.argmax(diff))
                a, b = outs[0][o].reshape(-1)[first], outs[r][o].reshape(-1)[first]
                findings.append(Finding(
                    "race",
                    f"output '{name}' differs between thread orders ({_RUNS[0][0]} vs {_RUNS[r][0]}) at "
                    f"{int(diff.sum())} elements, first {_index(shape, first)} ({a} vs {b}): a missing barrier, a read "
                    f"of uninitialised threadgroup memory, two threads writing one element, or a shuffle from an "
                    f"inactive lane"))
                break
    return findings


def host_inputs(inputs: Sequence[Any]) -> list[np.ndarray]:
    """Row-contiguous host copies of the inputs, as `execute` takes them (call from the thread that owns MLX)."""
    return [_np(x) for x in inputs]


def to_float32(a: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """An output `execute` returned, as float32 (bfloat16 arrives as its uint16 bits)."""
    if dtype == mx.bfloat16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def execute(src: MetalSource, inputs: list[np.ndarray], output_shapes: Sequence[Sequence[int]],
            output_dtypes: Sequence[mx.Dtype], grid: Sequence[int], threadgroup: Sequence[int],
            init_value: float | None = None, runs: int = 2, choices: Choices = DEFAULT_CHOICES,
            timeout: int = 60, seed: int = 0) -> tuple[list[np.ndarray], list[Finding]]:
    """Build and run on host arrays (no MLX calls: safe on worker threads). Returns the first run's outputs (numpy;
    bfloat16 as uint16 bits) and every finding; outputs are empty when a finding stopped the run."""
    grid, requested = tuple(int(g) for g in grid), tuple(int(t) for t in threadgroup)
    if len(grid) != 3 or len(requested) != 3 or min(grid) < 1 or min(requested) < 1:
        raise ValueError(f"grid and threadgroup need three positive sizes, got {grid} and {requested}")
    if not 1 <= runs <= len(_RUNS):
        raise ValueError(f"runs must be 1..{len(_RUNS)}")
    n_threads = requested[0] * requested[1] * requested[2]
    if n_threads > choices.max_threads_per_threadgroup:
        return [], [Finding("threadgroup-size", f"a threadgroup of {requested} is {n_threads} threads; Metal allows "
                                                f"at most {choices.max_threads_per_threadgroup}")]
    tg = tuple(min(t, g) for t, g in zip(requested, grid))  # dispatch_threads(grid, min(threadgroup, grid))
    try:
        exe = build(src, choices)
    except EmulatorError as e:
        return [], e.findings
    with tempfile.TemporaryDirectory(prefix="mlxc-emu-") as d:
        req, resp = Path(d) / "request", Path(d) / "response"
        req.write_bytes(_request(src, inputs, output_shapes, output_dtypes, grid, tg, runs, init_value, choices,
                                 timeout, seed))
        try:
            proc = subprocess.run([str(exe), str(req), str(resp)], capture_output=True, text=True,
                                  timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            return [], [Finding("deadlock", f"the emulator made no progress in {timeout} s")]
        findings = []
        for line in proc.stdout.splitlines():
            tag, _, rest = line.partition(" ")
            kind, _, msg = rest.partition("\t")
            if tag in ("FATAL", "GUARD"):
                f = Finding(kind, msg)
                if f not in findings:
                    findings.append(f)
        if proc.returncode not in (0, 3):
            findings.append(Finding("crash", f"the emulator exited with status {proc.returncode}: "
                                             f"{proc.stderr.strip()[-500:]}"))
        if proc.returncode != 0:
            return [], findings
        data = resp.read_bytes()
    outs: list[list[np.ndarray]] = []
    pos = 0
    for _ in range(runs):
        run_out = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            dt = np.dtype(_NP_DTYPES[dtype])
            n = int(np.prod(shape, dtype=np.int64))
            run_out.append(np.frombuffer(data, dt, n, pos).reshape(tuple(shape)))
            pos += n * dt.itemsize
        outs.append(run_out)
    findings += _compare_runs(src, outs, output_shapes, init_value)
    return [a.copy() for a in outs[0]], findings


def emulate_result(src: MetalSource, inputs: Sequence[Any], output_shapes: Sequence[Sequence[int]],
                   output_dtypes: Sequence[mx.Dtype], grid: Sequence[int], threadgroup: Sequence[int],
                   init_value: float | None = None, runs: int = 2, choices: Choices = DEFAULT_CHOICES,
                   timeout: int = 60, seed: int = 0) -> EmulatorResult:
    """Run `src` over `grid` (counted in threads, as MLX counts it) in threadgroups of `threadgroup`; outputs of the
    first run and every finding (nothing raised for findings)."""
    outs, findings = execute(src, host_inputs(inputs), output_shapes, output_dtypes, grid, threadgroup, init_value,
                             runs, choices, timeout, seed)
    return EmulatorResult([_to_mx(a, d) for a, d in zip(outs, output_dtypes)], findings, runs)


def emulate(src: MetalSource, inputs: Sequence[Any], output_shapes: Sequence[Sequence[int]],
            output_dtypes: Sequence[mx.Dtype], grid: Sequence[int], threadgroup: Sequence[int],
            init_value: float | None = None, runs: int = 2, choices: Choices = DEFAULT_CHOICES,
            timeout: int = 60) -> list[mx.array]:
    """Like `mx.fast.metal_kernel(...)(...)`: the outputs, or EmulatorError with every finding."""
    res = emulate_result(src, inputs, output_shapes, output_dtypes, grid, threadgroup, init_value, runs, choices,
                         timeout)
    if res.findings:
        raise EmulatorError(res.findings, src.kernel_name)
    return res.outputs
