"""Print the IR of a model (text, JSON, DOT or SVG), at the end of the pipeline or after a chosen pass; or write
one self-contained HTML page to explore the whole compilation (`--format html`)."""

from __future__ import annotations

from pathlib import Path

from ..ir.errors import MlxcError
from .common import add_passes, add_source, build_options, non_negative_int, note, positive_int, write

HELP = "print the IR of a model"


def add_parser(p) -> None:
    add_source(p, build_flags=False)
    add_passes(p)
    p.add_argument("--format", choices=("text", "json", "dot", "svg", "html"), default="text",
                   help="html: one self-contained page with every pass's IR and diff, the graphs, the generated "
                        "module, the parameter and layer tables (opens from disk, no network)")
    p.add_argument("--after", metavar="PASS", help="stop the pipeline after this pass")
    p.add_argument("--ranks", type=positive_int, default=None, metavar="N",
                   help="show one rank's share of the model split over N ranks (collectives and weight slices)")
    p.add_argument("--parallel", choices=("tensor", "pipeline"), default=None,
                   help="with --ranks: how the model is split (tensor: every layer divided; pipeline: layer ranges)")
    p.add_argument("--rank", type=non_negative_int, default=0, help="with --ranks: which rank's program (default 0)")
    p.add_argument("-o", "--output", help="write to a file instead of stdout")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")


def run(args) -> int:
    from ..api import program_for
    from ..ir import to_dot, to_json, to_svg

    if args.output and Path(args.output).exists() and not args.force:
        raise MlxcError(f"{args.output} already exists (use --force to replace it)")
    if args.format == "html":
        text = _html(args)
    else:
        program = _program(args)
        render = {"text": str, "json": to_json, "dot": to_dot, "svg": to_svg}[args.format]
        text = render(program)
    if args.output:
        from ..files import write_text_atomic

        write_text_atomic(Path(args.output), text)
        size = len(text.encode())
        note(f"wrote {args.output}" + (f" ({size / 1024:.0f} KiB)" if args.format == "html" else ""))
    else:
        write(text)
    return 0


def _html(args) -> str:
    from ..tools.explorer import explore, render_html

    options = build_options(args)
    if (getattr(args, "ranks", None) or 1) > 1 or options.pop("parallel", None) is not None:
        raise MlxcError("--format html shows the whole model; a rank's share (--ranks) has the text forms")
    exploration = explore(args.src, **options, stop_after=args.after, on_report=lambda r: note(f"pass {r}"),
                          notify=note)
    return render_html(exploration)


def _program(args):
    from ..api import program_for

    options = build_options(args)
    parallel = options.pop("parallel", None)
    if args.ranks is None or args.ranks == 1:
        if parallel is not None or args.rank:
            raise MlxcError("--parallel and --rank show a rank's share: give --ranks N (N > 1) too")
        return program_for(args.src, **options, stop_after=args.after, on_report=lambda r: note(f"pass {r}"),
                           notify=note)
    if parallel is None:
        raise MlxcError(f"--ranks {args.ranks}: say how the model is split, --parallel tensor or --parallel pipeline")
    from ..parallel import program_for_rank

    return program_for_rank(args.src, parallel, args.ranks, args.rank, **options, stop_after=args.after,
                            on_report=lambda r: note(f"pass {r}"))
