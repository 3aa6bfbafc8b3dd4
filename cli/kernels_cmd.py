"""List custom kernels and which one each target would use; check them in the emulator; print their source.

  mlxc kernels                    every kernel, what it implements, and the implementation per target
  mlxc kernels check              every kernel across shapes, dtypes and features, run in the Metal emulator and
                                  compared with its reference ops; exits 1 on any failure
  mlxc kernels source NAME        the full Metal source MLX would compile (--cuda: the CUDA twin, --emulator: the
                                  C++ translation unit the emulator compiles)
"""

from __future__ import annotations

import json

from rich.table import Table

from ..ir.errors import MlxcError
from .common import DTYPES, consoles, note, progress, write

HELP = "list custom kernels and which one each target would use; `check` runs them in the emulator; `source NAME`"


def add_parser(p) -> None:
    p.add_argument("action", nargs="?", choices=("list", "check", "source"), default="list",
                   help="list (default), check, or source NAME")
    p.add_argument("name", nargs="?", help="the kernel for `source` (e.g. attention_decode)")
    p.add_argument("--only", help="check: comma-separated kernels")
    p.add_argument("--dtype", help=f"check: comma-separated dtypes ({', '.join(DTYPES)}); source: the dtype "
                                   "(default float32)")
    p.add_argument("--runs", type=int, choices=(1, 2, 3), default=2,
                   help="check: thread orders per case (forward, reversed, shuffled); 2 by default")
    p.add_argument("--jobs", type=int, default=None, help="check: cases compiled and run at once (default 2)")
    p.add_argument("--json", action="store_true", help="list/check: JSON on stdout instead of a table")
    p.add_argument("--cuda", action="store_true", help="source: the CUDA twin, as mx.fast.cuda_kernel builds it")
    p.add_argument("--emulator", action="store_true", help="source: the C++ the emulator compiles")


def _split(text: str | None) -> list[str]:
    return [t for t in (text or "").replace(" ", "").split(",") if t]


def _list(args) -> int:
    from ..kernels.registry import REGISTRY, TARGETS

    if args.json:
        write(json.dumps([{"name": i.name, "op": i.op, "mlx_name": i.kernel.name, "implements": i.implements,
                           "reference": i.reference, "cuda_twin": i.has_cuda,
                           "targets": {t: i.implementation(t) for t in TARGETS}} for i in REGISTRY.values()],
                         indent=2))
        return 0
    t = Table(title="custom kernels (Metal body, CUDA twin, plain-MLX reference)")
    t.add_column("kernel")
    t.add_column("IR op")
    t.add_column("implements", overflow="fold")
    for target in TARGETS:
        t.add_column(target)
    names = {"metal": "Metal kernel", "cuda": "CUDA twin", "reference": "reference ops"}
    for i in REGISTRY.values():
        t.add_row(i.name, i.op, i.implements, *(names[i.implementation(target)] for target in TARGETS))
    consoles.out.print(t)
    consoles.out.print("metal: mx.fast.metal_kernel on an Apple GPU; cuda: mx.fast.cuda_kernel under mlx[cuda]; "
                       "cpu: the reference MLX ops. select-kernels makes the choice per op and target (the generated "
                       "module calls kernel_attention / kernel_selective_scan / kernel_ssd with impl=...). "
                       "`mlxc kernels check` runs the Metal sources here, in the emulator; `--kernels emulated` "
                       "(mlxc.load(kernels=\"emulated\")) runs whole models through it.", markup=False)
    return 0


def _check(args) -> int:
    from ..kernels.check import run_checks

    dtypes = _split(args.dtype)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise MlxcError(f"unknown dtype(s) {', '.join(bad)}; expected {', '.join(DTYPES)}")
    rows = run_checks(only=_split(args.only), dtypes=dtypes, runs=args.runs, jobs=args.jobs,
                      progress=None if args.json else progress)
    if not rows:
        raise MlxcError("no kernel check matches --only/--dtype")
    failed = [r for r in rows if not r.ok]
    if args.json:
        write(json.dumps([{"kernel": r.kernel, "config": r.config, "dtype": r.dtype, "max_error": r.error,
                           "tolerance": r.tolerance, "verdict": r.verdict, "detail": r.detail} for r in rows],
                         indent=2))
        return 1 if failed else 0
    t = Table(title="kernels in the Metal emulator vs their reference ops")
    for c in ("kernel", "config", "dtype"):
        t.add_column(c)
    t.add_column("max error", justify="right")
    t.add_column("tolerance", justify="right")
    t.add_column("verdict")
    for r in rows:
        err = "-" if r.error is None else f"{r.error:.2e}"
        t.add_row(r.kernel, r.config, r.dtype, err, f"{r.tolerance:g}",
                  "ok" if r.ok else "[bold red]FAIL[/bold red]")
    consoles.out.print(t)
    for r in failed:
        consoles.out.print(f"FAIL {r.kernel} [{r.dtype}] {r.config}: {r.detail}", markup=False, highlight=False)
    consoles.out.print(f"{len(rows) - len(failed)} of {len(rows)} passed "
                       "(error: max |kernel - reference| / max(1, max |reference|))")
    return 1 if failed else 0


def _source(args) -> int:
    import mlx.core as mx

    from ..kernels.check import all_cases
    from ..kernels.registry import lookup

    if not args.name:
        raise MlxcError("`mlxc kernels source` needs a kernel name; `mlxc kernels` lists them")
    info = lookup(args.name)
    dtype = args.dtype or "float32"
    if dtype not in DTYPES:
        raise MlxcError(f"unknown dtype {dtype}; expected {', '.join(DTYPES)}")
    mxd = getattr(mx, dtype)
    case = next((c for c in all_cases() if c.kernel == info.name and c.dtype == mxd), None)
    if case is None:
        case = next(c for c in all_cases() if c.kernel == info.name)
    launch, _ = case.make()
    if args.cuda:
        if not info.has_cuda:
            raise MlxcError(f"kernel {info.name} has no CUDA twin")
        write(info.kernel.cuda_source(launch)[1])
        return 0
    src = info.kernel.metal_source(launch)
    if args.emulator:
        from ..kernels.emulator import translation_unit

        write(translation_unit(src))
        return 0
    note(f"{src.kernel_name}: {case.config} [{dtype}], grid {launch.grid}, threadgroup {launch.threadgroup} "
         "(byte for byte the source mx.fast.metal_kernel builds; a Mac prepends MLX's metal::utils() to compile it)")
    write(src.source)
    return 0


def run(args) -> int:
    if args.action == "check":
        return _check(args)
    if args.action == "source":
        return _source(args)
    if args.name:
        raise MlxcError(f"unexpected argument {args.name!r}; did you mean `mlxc kernels source {args.name}`?")
    return _list(args)
