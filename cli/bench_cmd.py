"""Prefill and decode tokens/s of a model, best of several rounds after a warm-up; or several variants of it side
by side (`--compare fusion,compile`: medians and spreads, a table, `--json`, bar charts with `--html` / `--plot`)."""

from __future__ import annotations

from rich.table import Table

from ..ir.errors import MlxcError
from .common import add_trust, trust_option
from .common import (add_passes, add_source, build_options, consoles, non_negative_int, note, positive_int, progress,
                     write)
from .common import add_parallel  # --ranks / --parallel (mlxc.parallel)

HELP = "prefill and decode tokens/s"


def add_parser(p) -> None:
    add_source(p)
    add_trust(p)
    add_passes(p)
    add_parallel(p)
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--gen-len", type=positive_int, default=32)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed rounds (default 3; with --compare 5)")
    p.add_argument("--compare", metavar="AXES",
                   help="time variants side by side, every combination of the named axes (fusion: unfused vs fused "
                        "projections; compile: eager vs mx.compile of the stateless functions; scan: Mamba's "
                        "sequential vs chunked selective scan; kernels: MLX's ops vs mlxc's custom kernels where this "
                        "device runs them), e.g. fusion,compile")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first (--compare)")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object (--compare)")
    p.add_argument("--html", metavar="FILE", help="write the comparison's bar charts as one self-contained page")
    p.add_argument("--plot", metavar="FILE", help="write the bar charts as a .png or .svg figure")
    p.add_argument("--profile", nargs="?", const="decode", choices=("decode", "prefill"),
                   help="break one decode step (or the prompt's step) into its ops by kind, with their times")


def run(args) -> int:
    if args.compare is not None and args.profile:
        raise MlxcError("--profile breaks one model's step into ops; --compare times variants: choose one")
    if args.compare is not None:
        return _compare(args)
    wants = [flag for flag, v in (("--json", args.json), ("--html", args.html), ("--plot", args.plot)) if v]
    if wants:
        raise MlxcError(f"{', '.join(wants)} report a comparison: add --compare AXES (e.g. --compare fusion)")
    from ..api import load
    from ..blas import active_blas
    from ..runtime.bench import bench_model

    if args.kernels == "emulated":
        from ..tools.bench_compare import EMULATED_REFUSED

        raise MlxcError(EMULATED_REFUSED)
    if args.profile and (args.batch != 1 or args.repeats is not None or getattr(args, "ranks", None)):
        raise MlxcError("--profile times one sequence's steps in this process: it takes no --batch, --repeats or "
                        "--ranks")
    model = load(args.src, **build_options(args), **trust_option(args), progress=progress)
    if args.profile:
        return _profile(model, args)
    result = bench_model(model, prompt_len=args.prompt_len, gen_len=args.gen_len, batch=args.batch,
                         repeats=args.repeats or 3, progress=progress)
    split = f", {model.ranks} ranks, {model.parallel} parallel" if getattr(model, "ranks", 1) > 1 else ""
    t = Table(title=f"{args.src} ({model.dtype}, BLAS: {active_blas().name}{split})")
    for c in ("phase", "tokens", "tokens/s", "ms/token"):
        t.add_column(c, justify="right" if c != "phase" else "left")
    for phase, tokens, tps in (("prefill", result.prompt_tokens, result.prefill_tps),
                               ("decode", result.gen_tokens, result.decode_tps)):
        t.add_row(phase, str(tokens), f"{tps:,.1f}", f"{1e3 / tps:.2f}")
    consoles.out.print(t)
    _ranks(model)
    return 0


def _profile(model, args) -> int:
    from ..runtime.profile import profile_decode

    prefill = args.profile == "prefill"
    p = profile_decode(model, prompt_len=args.prompt_len, steps=args.gen_len, prefill=prefill)
    what = f"the {p.prompt_tokens}-token prompt's step" if prefill else f"one decode step after {p.prompt_tokens} tokens"
    t = Table(title=f"{args.src}: {what}, by op kind (mean of {p.steps} steps)")
    for c in ("op kind", "calls", "ms", "ms without checkpoints", "share"):
        t.add_column(c, justify="left" if c == "op kind" else "right")
    for kind, calls, ms in p.rows:
        t.add_row(kind, str(calls), f"{ms:.3f}", f"{p.net_ms(calls, ms):.3f}", f"{ms / p.profiled_ms:.0%}")
    consoles.out.print(t)
    note(f"a plain step takes {p.step_ms:.2f} ms; profiled, with an evaluation after every op "
         f"({p.checkpoint_us:.1f} us each by itself), {p.profiled_ms:.2f} ms: compare the shares, not the sums")
    return 0


def _ranks(model) -> None:
    """A split model (--ranks): each rank's peak memory."""
    from ..runtime import distributed

    if distributed.current() is None:
        return
    t = Table(title=f"{model.ranks} ranks, {model.parallel} parallel: peak memory per rank")
    for c in ("rank", "MLX peak GB", "resident peak GB"):
        t.add_column(c, justify="right")
    for rank, (arrays, resident) in enumerate(distributed.peak_memory()):
        t.add_row(str(rank), f"{arrays:.3f}", f"{resident:.3f}")
    consoles.out.print(t)


def _compare(args) -> int:
    import json
    from pathlib import Path

    from ..blas import active_blas
    from ..tools.bench_compare import compare, parse_axes

    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".svg"):
        raise MlxcError(f"--plot {args.plot}: the figure is written as .png or .svg")  # before minutes of timing
    axes = parse_axes(args.compare)
    options = {**build_options(args), **trust_option(args)}
    report = compare(args.src, axes, options=options, prompt_len=args.prompt_len, gen_len=args.gen_len,
                     batch=args.batch, warmup=args.warmup, repeats=args.repeats or 5, progress=progress)
    if args.json:
        write(json.dumps(report.to_json()))
    else:
        _print_comparison(report, active_blas().name)
    if args.html or args.plot:
        from ..files import write_text_atomic
        from ..tools import charts

        fig = charts.bench_figure(report)
        if args.plot:
            note(f"wrote {charts.save_figure(fig, args.plot)}")
        if args.html:
            caption = (f"{report.prompt_tokens}-token prefill and {report.gen_tokens} decode steps, batch "
                       f"{report.batch}, {report.warmup} warm-up + {report.repeats} timed rounds per variant, "
                       f"{report.dtype}, BLAS {report.blas}")
            page = charts.html_page(f"mlxc bench --compare {','.join(report.axes)}: {report.source}", fig,
                                    charts.bench_table(report), report.to_json(), caption)
            write_text_atomic(Path(args.html), page)
            note(f"wrote {args.html}")
    return 0


def _print_comparison(report, blas: str) -> None:
    from ..tools.charts import bench_table

    rows = bench_table(report)
    t = Table(title=f"{report.source} ({report.dtype}, BLAS: {blas}) · {report.prompt_tokens}-token prefill, "
                    f"{report.gen_tokens} decode steps · median of {report.repeats} rounds")
    for i, c in enumerate(rows[0]):
        t.add_column(c, justify="right" if 0 < i < 5 else "left", overflow="fold")
    for r in rows[1:]:
        t.add_row(*r)
    consoles.out.print(t)
