"""Compile a model into a self-contained artifact directory (model.py, weights, IR, tokenizer, manifest)."""

from __future__ import annotations

from .common import add_passes, add_source, build_options, progress, write

HELP = "compile a model into a self-contained artifact directory"


def add_parser(p) -> None:
    add_source(p)
    add_passes(p)
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--dump-dir", help="write the IR after each pass here (NN-pass.mlxc)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")


def run(args) -> int:
    from ..api import compile as compile_artifact
    from .common import note

    reports = []
    out = compile_artifact(args.src, args.output, **build_options(args), overwrite=args.force,
                           dump_dir=args.dump_dir, progress=progress, on_report=reports.append)
    for r in reports:
        note(f"  pass {r}")
    write(f"compiled {args.src} -> {out}")
    return 0
