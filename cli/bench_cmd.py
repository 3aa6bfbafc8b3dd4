"""Prefill and decode tokens/s of a model, best of several rounds after a warm-up."""

from __future__ import annotations

from rich.table import Table

from .common import add_passes, add_source, build_options, consoles, positive_int, progress

HELP = "prefill and decode tokens/s"


def add_parser(p) -> None:
    add_source(p)
    add_passes(p)
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--gen-len", type=positive_int, default=32)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=3)


def run(args) -> int:
    from ..api import load
    from ..blas import active_blas
    from ..runtime.bench import bench_model

    model = load(args.src, **build_options(args), progress=progress)
    result = bench_model(model, prompt_len=args.prompt_len, gen_len=args.gen_len, batch=args.batch,
                         repeats=args.repeats, progress=progress)
    t = Table(title=f"{args.src} ({model.dtype}, BLAS: {active_blas().name})")
    for c in ("phase", "tokens", "tokens/s", "ms/token"):
        t.add_column(c, justify="right" if c != "phase" else "left")
    for phase, tokens, tps in (("prefill", result.prompt_tokens, result.prefill_tps),
                               ("decode", result.gen_tokens, result.decode_tps)):
        t.add_row(phase, str(tokens), f"{tps:,.1f}", f"{1e3 / tps:.2f}")
    consoles.out.print(t)
    return 0
