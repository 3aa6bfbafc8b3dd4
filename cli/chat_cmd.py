"""A multi-turn conversation on stdin; the model's state carries over between turns."""

from __future__ import annotations

import sys

from rich.text import Text

from .common import add_trust, trust_option
from .common import add_passes, add_sampling, add_source, build_options, consoles, note, progress, sampling
from .common import add_parallel  # --ranks / --parallel (mlxc.parallel)

HELP = "a multi-turn conversation on stdin; the KV cache carries over between turns"


def add_parser(p) -> None:
    add_source(p)
    add_trust(p)
    add_passes(p)
    add_parallel(p)
    add_sampling(p)
    p.add_argument("--system", "--system-prompt", dest="system", help="system prompt")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file used instead of the model's")


def run(args) -> int:
    from ..api import load
    from ..runtime.chat import ChatSession
    from .run_cmd import _read_template

    template = _read_template(args.chat_template)
    model = load(args.src, **build_options(args), **trust_option(args), progress=progress)
    model.require_causal_lm("mlxc chat")
    options = sampling(args)
    ctx = model.context_length
    if ctx is not None and options["max_kv_size"] is None and options["max_new_tokens"] > ctx:
        note(f"--max-new-tokens {options['max_new_tokens']} clipped to the model's context of {ctx} "
             "(--max-kv-size N lifts this)")
        options["max_new_tokens"] = ctx
    session = ChatSession(model, system=args.system, chat_template=template, **options)
    interactive = sys.stdin.isatty()
    if interactive:
        consoles.err.print(Text("Type a message; an empty line or Ctrl-D ends the chat.", style="dim"))
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        sys.stdout.write("assistant> " if interactive else "")
        for piece in session.send(line.rstrip("\n")):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        consoles.err.print(Text(f"({session.reused} prompt tokens reused from the cache)", style="dim"))
