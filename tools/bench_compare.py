"""`mlxc bench --compare`: the same model under several settings, timed side by side.

A comparison is a set of axes (`fusion`, `compile`, ...), each a short list of settings whose first is the
baseline; the variants are every combination. A setting adds options to `mlxc.load` (`passes=...`) and/or changes
the loaded model in place (`prepare`), so a new axis (scan kernels, native kernels, ...) is one `register(Axis(...))`
in this module or in the module that owns the feature. Registered here: `fusion`, `compile`, `scan` (Mamba's
sequential vs chunked selective scan) and `kernels` (MLX's ops vs mlxc's custom kernels where the device runs
them; the emulator is never timed).

Every variant is loaded once. Each round times one prefill and `gen_len` greedy decode steps of every variant back
to back, in an order that alternates between rounds, so slow drifts of the machine hit all variants alike. Warm-up
rounds are not kept; the report gives each variant's median and its spread (min and max) over the kept rounds.
"""

from __future__ import annotations

import functools
import itertools
import math
import platform
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from ..ir.errors import MlxcError
from ..passes.pipeline import DEFAULT_PIPELINE

Progress = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class Setting:
    """One value of an axis: options for `mlxc.load`, and a change to the loaded model that returns a note."""

    name: str
    load: Mapping[str, Any] = field(default_factory=dict)
    prepare: Optional[Callable[[Any], str]] = None


@dataclass(frozen=True)
class Axis:
    name: str
    doc: str
    settings: tuple[Setting, ...]  # the first is the baseline


AXES: dict[str, Axis] = {}


def register(axis: Axis) -> Axis:
    if axis.name in AXES:
        raise ValueError(f"bench axis {axis.name!r} registered twice")
    AXES[axis.name] = axis
    return axis


# ------------------------------------------------------------------------------------------------------ axes

UNFUSED = tuple(p for p in DEFAULT_PIPELINE if p not in ("fuse-qkv", "fuse-gate-up"))


def compile_stateless(model) -> str:
    """`mx.compile` every generated submodule whose IR function keeps no state (the MLP, a norm block), so MLX can
    fuse its elementwise work. Functions with state (attention with its KV cache, recurrent layers) stay eager:
    their caches index with Python ints that change every token, which would retrace a compiled step each call."""
    import mlx.core as mx

    from ..codegen.emit import class_name

    program = model.program
    names = [fn.name for fn in program.functions if fn.name != program.ENTRY and not program.states(fn)]
    for name in names:
        cls = getattr(model.module, class_name(name), None)
        if cls is None or getattr(cls, "_mlxc_compiled_call", False):
            continue
        eager = cls.__call__

        def call(self, *args, _eager=eager):
            fn = self.__dict__.get("_mlxc_compiled")
            if fn is None:  # one compiled function per instance: it captures that instance's weights
                fn = mx.compile(functools.partial(_eager, self))
                self.__dict__["_mlxc_compiled"] = fn
            return fn(*args)

        cls.__call__ = call
        cls._mlxc_compiled_call = True
    return f"mx.compile on {', '.join('@' + n for n in names)}" if names else "no stateless function to compile"


register(Axis("fusion", "unfused q/k/v and gate/up projections vs fused ones (fuse-qkv, fuse-gate-up)",
              (Setting("unfused", {"passes": list(UNFUSED)}), Setting("fused", {"passes": list(DEFAULT_PIPELINE)}))))
register(Axis("compile", "the generated module as written vs mx.compile of its stateless functions",
              (Setting("eager"), Setting("compiled", prepare=compile_stateless))))


def _ops(model, name: str):
    return [o for fn in model.program.functions for o in fn.ops if o.op == name]


def _scan_mode(mode: str) -> Callable[[Any], str]:
    """Run the prefill of every `selective_scan` (Mamba v1, Jamba) as `mode`: "sequential" (one step per token, the
    reference recurrence) or "chunked" (blocks of chunks in compiled graphs; see templates/selective_scan.py.j2)."""

    def prepare(model) -> str:
        from ..ir import Kernel

        scans = _ops(model, "selective_scan")
        if not scans:
            other = ", ".join(sorted({o.op for fn in model.program.functions for o in fn.ops
                                      if o.op in ("ssd", "lstm", "gru", "mingru")}))
            raise MlxcError("--compare scan times the sequential against the chunked selective scan of Mamba (v1) "
                            "layers, and this model has none"
                            + (f" (its {other} layers are other scans)" if other else ""))
        # SELECTIVE_SCAN set to a mode overrides the native CPU kernel (its helper runs it only on "auto"), not the
        # GPU kernels, which run their own helper
        if any(o.attrs.get("kernel", Kernel.REFERENCE) not in (Kernel.REFERENCE, Kernel.NATIVE) for o in scans):
            raise MlxcError("--compare scan times the reference ops' two scans, but this model's selective scan runs "
                            f"the {scans[0].attrs['kernel'].value} kernel: add --kernels reference")
        model.module.SELECTIVE_SCAN = mode
        return f"selective scan prefill {mode}"

    return prepare


def _kernels_note(model, custom: bool = False) -> str:
    """What runs a custom kernel in this variant, and what cannot be timed on this machine."""
    from collections import Counter

    from ..api import gpu_kernels
    from ..ir import Kernel

    counts = Counter(o.attrs["kernel"].value for fn in model.program.functions for o in fn.ops
                     if o.attrs.get("kernel", Kernel.REFERENCE) != Kernel.REFERENCE)
    used = ", ".join(f"{k} kernels on {n} IR ops" for k, n in sorted(counts.items())) or "MLX's ops"
    if not counts and custom:
        used = "no custom kernel runs" + (" (the native CPU kernels take 4- and 8-bit weights: --quantize 4 or 8)"
                                          if gpu_kernels() is None else "")
    if custom and gpu_kernels() is None and any(_ops(model, op) for op in ("attention", "selective_scan", "ssd")):
        used += "; the Metal attention/scan kernels need an Apple GPU: not timed here"
    return used


EMULATED_REFUSED = ("kernels='emulated' runs the kernels in mlxc's emulator, a test instrument whose speed says "
                    "nothing about a GPU's: benchmarks refuse it")

register(Axis("scan", "Mamba's selective scan prefill: the sequential reference recurrence vs the chunked scan",
              (Setting("sequential", prepare=_scan_mode("sequential")),
               Setting("chunked", prepare=_scan_mode("chunked")))))
register(Axis("kernels", "built-in MLX ops vs mlxc's custom kernels where this device runs them (the CPU: the "
                         "native quantized kernels; an Apple GPU: the Metal attention and scan kernels)",
              (Setting("reference", {"kernels": "reference"}, prepare=_kernels_note),
               Setting("custom", {"kernels": "custom"}, prepare=functools.partial(_kernels_note, custom=True)))))


def parse_axes(text: str) -> list[Axis]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise MlxcError(f"--compare needs at least one axis; available: {', '.join(AXES)}")
    unknown = [n for n in names if n not in AXES]
    if unknown:
        raise MlxcError(f"--compare: unknown axis {unknown[0]!r}; available: {', '.join(AXES)}")
    if len(set(names)) != len(names):
        raise MlxcError("--compare names an axis twice")
    return [AXES[n] for n in names]


# ------------------------------------------------------------------------------------------------ the result


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> "Spread":
        return cls(statistics.median(xs), min(xs), max(xs))


@dataclass
class VariantResult:
    name: str  # "unfused+eager"
    settings: dict[str, str]  # axis -> setting
    prefill_tps: list[float]  # tokens/s of each kept round
    decode_tps: list[float]
    notes: list[str] = field(default_factory=list)

    @property
    def prefill(self) -> Spread:
        return Spread.of(self.prefill_tps)

    @property
    def decode(self) -> Spread:
        return Spread.of(self.decode_tps)


@dataclass
class CompareReport:
    source: str
    axes: list[str]
    prompt_tokens: int
    gen_tokens: int
    batch: int
    warmup: int
    repeats: int
    dtype: str
    blas: str
    variants: list[VariantResult]

    @property
    def baseline(self) -> VariantResult:
        return self.variants[0]

    def to_json(self) -> dict[str, Any]:
        def spread(s: Spread) -> dict[str, float]:
            return {"median": s.median, "min": s.min, "max": s.max}

        return {
            "source": self.source, "axes": self.axes, "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens, "batch": self.batch, "warmup": self.warmup, "repeats": self.repeats,
            "dtype": self.dtype, "blas": self.blas, "machine": platform.machine(),
            "variants": [{"name": v.name, "settings": v.settings, "prefill_tps": v.prefill_tps,
                          "decode_tps": v.decode_tps, "prefill": spread(v.prefill), "decode": spread(v.decode),
                          "notes": v.notes} for v in self.variants],
        }


# ------------------------------------------------------------------------------------------------ measuring


def _merge(settings: Sequence[Setting], base: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(base)
    for s in settings:
        for k, v in s.load.items():
            if k in base:
                raise MlxcError(f"the {s.name!r} setting chooses {k}= itself; drop that option from the command")
            options[k] = v
    return options


def compare(src, axes: Sequence[Axis], *, options: Optional[Mapping[str, Any]] = None, prompt_len: int = 128,
            gen_len: int = 32, batch: int = 1, warmup: int = 1, repeats: int = 5, seed: int = 0,
            progress: Progress = None) -> CompareReport:
    """Load every combination of the axes' settings and time them round by round (see the module docstring)."""
    from ..api import load
    from ..blas import active_blas
    from ..runtime.bench import prompt_ids, time_round

    if repeats < 1 or warmup < 0:
        raise MlxcError("--repeats must be >= 1 and --warmup >= 0")
    if (options or {}).get("kernels") == "emulated":
        raise MlxcError(EMULATED_REFUSED)
    combos = list(itertools.product(*(a.settings for a in axes)))
    models, results = [], []
    for combo in combos:
        name = "+".join(s.name for s in combo)
        if progress:
            progress(f"loading {name}")
        model = load(src, **_merge(combo, options or {}))
        notes = [s.prepare(model) for s in combo if s.prepare is not None]
        models.append(model)
        results.append(VariantResult(name, {a.name: s.name for a, s in zip(axes, combo)}, [], [], notes))
    ids = prompt_ids(models[0].vocab_size, prompt_len, batch, seed)
    for r in range(warmup + repeats):
        order = list(range(len(models)))
        if r % 2:
            order.reverse()
        for k in order:
            prefill, decode = time_round(models[k], ids, gen_len)
            if r >= warmup:
                results[k].prefill_tps.append(batch * prompt_len / prefill)
                results[k].decode_tps.append(batch * gen_len / decode if decode > 0 else math.inf)
        if progress:
            progress(f"round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    return CompareReport(str(src), [a.name for a in axes], batch * prompt_len, batch * gen_len, batch, warmup,
                         repeats, models[0].dtype, active_blas().name, results)
