"""Perplexity of a text file under a model, in sliding windows (transformers' fixed-length-model convention)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..ir.errors import MlxcError
from .common import add_trust, trust_option
from .common import add_passes, add_source, build_options, consoles, positive_int, progress, write
from .common import add_parallel  # --ranks / --parallel (mlxc.parallel)

HELP = "perplexity of a text file in sliding windows"


def add_parser(p) -> None:
    add_source(p)
    add_trust(p)
    add_passes(p)
    add_parallel(p)
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file to score ('-' reads stdin)")
    p.add_argument("--context", type=positive_int, default=None,
                   help="tokens per window (default 512, at most the model's context length)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="tokens between window starts; each window scores only tokens no earlier window scored "
                        "(default: half the context)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _read_text(name: str) -> str:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MlxcError(f"{name} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise MlxcError(f"{name} holds no text to score")
    return text


class _Throttled:
    """Window progress at most about once a second (and always the last), so long files do not flood stderr."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= 1.0:
            self.last = now
            progress(f"window {done}/{total}")


def run(args) -> int:
    from ..api import load
    from ..runtime.perplexity import perplexity

    text = _read_text(args.file)
    model = load(args.src, **build_options(args), **trust_option(args), progress=progress)
    result = perplexity(model, text, context=args.context, stride=args.stride, progress=_Throttled())
    if args.json:
        write(json.dumps({"source": args.src, "file": args.file, "perplexity": result.perplexity,
                          "nll": result.nll, "tokens": result.tokens, "context": result.context,
                          "stride": result.stride, "windows": result.windows}))
        return 0
    consoles.out.print(f"perplexity {result.perplexity:.4f} over {result.tokens:,} tokens "
                       f"(mean NLL {result.nll:.4f} nats; context {result.context}, stride {result.stride}, "
                       f"{result.windows} window{'s' if result.windows != 1 else ''})")
    return 0
