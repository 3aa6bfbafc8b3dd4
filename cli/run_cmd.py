"""Generate from a text prompt or from token ids, streaming the continuation to stdout."""

from __future__ import annotations

import sys
import time

from ..ir.errors import MlxcError
from .common import add_passes, add_sampling, add_source, build_options, int_list, note, progress, sampling

HELP = "generate from a prompt or token ids"


def add_parser(p) -> None:
    add_source(p)
    add_passes(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text prompt (needs a tokenizer)")
    g.add_argument("--tokens", type=int_list, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling(p)


def run(args) -> int:
    import mlx.core as mx

    from ..api import load

    if args.chat and args.prompt is None:
        raise MlxcError("--chat needs --prompt text, not --tokens")
    model = load(args.src, **build_options(args), progress=progress)
    options = sampling(args)
    start = time.perf_counter()
    count = 0
    if args.prompt is not None:
        for piece in model.generate_text(args.prompt, chat=args.chat, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
            count += 1
        sys.stdout.write("\n")
    else:
        ids = mx.array([args.tokens])
        first = True
        for step in model.stream(ids, **options):
            sys.stdout.write(("" if first else ",") + str(step[0].item()))
            sys.stdout.flush()
            first = False
            count += 1
        sys.stdout.write("\n")
    note(f"{count} pieces in {time.perf_counter() - start:.2f} s")
    return 0
