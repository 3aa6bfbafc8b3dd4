"""Compare a compiled model with transformers (or with a second mlxc model) layer by layer, to find where they part.

Rows: the embeddings, every layer's output, the final norm and the logits, each with max |diff| and the relative
error (max |diff| / max |reference|). Exit status 0 when every row is within --tol, 1 when one is not, 2 on bad
input. `--html FILE` / `--plot FILE.png|svg` draw the relative error per row on a log scale with the tolerance line
and the first divergent row marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..ir.errors import MlxcError
from .common import DTYPES, add_trust, build_options, consoles, int_list, progress, trust_option, write

HELP = "compare with transformers or another model, layer by layer"
DIVERGED = 1
BAD_INPUT = 2


def _tolerance(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return x


def add_parser(p) -> None:
    p.add_argument("src", help="the model (HF checkpoint dir, .gguf, artifact, preset:NAME, pkg:NAME, ...)")
    p.add_argument("src2", nargs="?", help="a second model to compare with instead of transformers")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--tokens", type=int_list, help="comma-separated token ids (default: 16 fixed ids)")
    inputs.add_argument("--prompt", help="text, encoded with SRC's tokenizer")
    p.add_argument("--tol", type=_tolerance, default=None,
                   help="largest relative error allowed (default 1e-4 in float32, 1e-2 float16, 5e-2 bfloat16)")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write the per-layer error chart as one self-contained page")
    p.add_argument("--plot", metavar="FILE", help="also write the per-layer error chart as a .png or .svg figure")
    for suffix, which in (("", "SRC"), ("2", "SRC2")):
        p.add_argument(f"--dtype{suffix}", choices=DTYPES, default=None, help=f"{which}'s dtype (default float32)")
        p.add_argument(f"--passes{suffix}", default=None, help=f"{which}'s pass pipeline, comma-separated")
        p.add_argument(f"--no-opt{suffix}", action="store_true", help=f"run no passes on {which}")
        p.add_argument(f"--quantize{suffix}", type=int, choices=(2, 3, 4, 5, 6, 8), default=None,
                       help=f"quantize {which}'s weights to this many bits")
        p.add_argument(f"--group-size{suffix}", type=int, choices=(32, 64, 128), default=None,
                       help=f"{which}'s quantization group size (default 64)")
    add_trust(p)


def _side(args, suffix: str) -> dict:
    """The `mlxc.load` options one side's flags ask for."""
    get = lambda name: getattr(args, name + suffix)  # noqa: E731
    if get("no_opt") and get("passes") is not None:
        raise MlxcError(f"--no-opt{suffix} runs no passes and --passes{suffix} names some: give one of them")
    if get("passes") is not None and not get("passes").replace(",", "").strip():
        raise MlxcError(f"--passes{suffix} is empty; name at least one pass, or use --no-opt{suffix} to run none")
    side = argparse.Namespace(dtype=get("dtype"), passes=get("passes"), no_opt=get("no_opt"),
                              quantize=get("quantize"), group_size=get("group_size"))
    return build_options(side)


def _print(report) -> None:
    from rich.table import Table

    t = Table(title=f"{report.candidate} vs {report.reference} · {len(report.tokens)} tokens · tol {report.tol:g}")
    for c, justify in (("tensor", "left"), ("max |diff|", "right"), ("rel. error", "right"), ("", "left")):
        t.add_column(c, justify=justify)
    first = report.first_divergent
    for r in report.rows:
        mark = "ok" if r.within else ("← first divergence" if r is first else "✗")
        style = None if r.within else "red"
        t.add_row(r.name, f"{r.max_abs:.3e}", f"{r.rel:.3e}", mark, style=style)
    consoles.out.print(t)
    if first is None:
        consoles.out.print(f"all {len(report.rows)} tensors within tolerance")
    else:
        layer = f" (layer {first.layer})" if first.layer is not None else ""
        consoles.out.print(f"first divergence: {first.name}{layer}, relative error {first.rel:.3e} > {report.tol:g}")


def run(args) -> int:
    from . import _error
    from ..tools.diff import diff

    try:
        if args.plot and Path(args.plot).suffix.lower() not in (".png", ".svg"):
            raise MlxcError(f"--plot {args.plot}: the figure is written as .png or .svg")
        options, options2 = _side(args, ""), _side(args, "2")
        if args.src2 is None and options2:
            flags = ", ".join("--passes2/--no-opt2" if k == "passes" else f"--{k.replace('_', '-')}2" for k in options2)
            raise MlxcError(f"{flags}: the second model's flags need a second source (mlxc diff SRC SRC2)")
        if trust_option(args):  # --trust: for the side(s) that are compiled artifacts
            from ..api import SourceKind, resolve

            sides = [(options, args.src)] + ([(options2, args.src2)] if args.src2 is not None else [])
            artifacts = [side for side, src in sides if resolve(src).kind == SourceKind.ARTIFACT]
            if not artifacts:
                raise MlxcError("--trust applies to compiled artifacts, and no model given here is one")
            for side in artifacts:
                side.update(trust_option(args))
        report = diff(args.src, args.src2, tokens=args.tokens, prompt=args.prompt, tol=args.tol, options=options,
                      options2=options2, progress=progress)
    except MlxcError as e:
        _error("error: ", str(e))
        return BAD_INPUT
    except OSError as e:
        _error("error: ", f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return BAD_INPUT
    if args.json:
        write(json.dumps(report.to_json()))
    else:
        _print(report)
    if args.html or args.plot:
        _charts(report, args)
    return 0 if report.ok else DIVERGED


def _charts(report, args) -> None:
    from ..files import write_text_atomic
    from ..tools import charts
    from .common import note

    fig = charts.diff_figure(report)
    if args.plot:
        note(f"wrote {charts.save_figure(fig, args.plot)}")
    if args.html:
        first = report.first_divergent
        caption = (f"tolerance {report.tol:g} on the relative error; " + (
            f"first divergence: {first.name}" + (f" (layer {first.layer})" if first.layer is not None else "")
            if first is not None else f"all {len(report.rows)} tensors within tolerance"))
        page = charts.html_page(f"mlxc diff: {report.candidate} vs {report.reference}", fig, charts.diff_table(report),
                                report.to_json(), caption)
        write_text_atomic(Path(args.html), page)
        note(f"wrote {args.html}")
