"""Print the IR of a model (text, JSON, DOT or SVG), at the end of the pipeline or after a chosen pass."""

from __future__ import annotations

from pathlib import Path

from ..ir.errors import MlxcError
from .common import add_passes, add_source, build_options, note, write

HELP = "print the IR of a model"


def add_parser(p) -> None:
    add_source(p, build_flags=False)
    add_passes(p)
    p.add_argument("--format", choices=("text", "json", "dot", "svg"), default="text")
    p.add_argument("--after", metavar="PASS", help="stop the pipeline after this pass")
    p.add_argument("-o", "--output", help="write to a file instead of stdout")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")


def run(args) -> int:
    from ..api import program_for
    from ..ir import to_dot, to_json, to_svg

    if args.output and Path(args.output).exists() and not args.force:
        raise MlxcError(f"{args.output} already exists (use --force to replace it)")
    program = program_for(args.src, **build_options(args), stop_after=args.after,
                          on_report=lambda r: note(f"pass {r}"), notify=note)
    render = {"text": str, "json": to_json, "dot": to_dot, "svg": to_svg}[args.format]
    text = render(program)
    if args.output:
        from ..files import write_text_atomic

        write_text_atomic(Path(args.output), text)
        note(f"wrote {args.output}")
    else:
        write(text)
    return 0
