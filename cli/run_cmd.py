"""Generate from a text prompt or from token ids, streaming the continuation to stdout.

Like `mlx_lm.generate`, a text prompt goes through the model's chat template when the tokenizer has one
(`--no-chat-template` / `--ignore-chat-template` for raw completion); `--chat` insists on the template and fails when
there is none, rather than silently completing raw text. Timings and peak memory go to stderr afterwards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..ir.errors import MlxcError
from .common import add_trust, trust_option
from .common import (add_passes, add_sampling, add_source, build_options, int_list, non_negative_int, note, progress,
                     sampling, write)
from .common import add_parallel  # --ranks / --parallel (mlxc.parallel)

HELP = "generate from a prompt or token ids"


def add_parser(p) -> None:
    add_source(p)
    add_trust(p)
    add_passes(p)
    add_parallel(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", "-p", help="text prompt ('-' reads it from stdin); needs a tokenizer")
    g.add_argument("--tokens", type=int_list, help="comma-separated token ids, e.g. 1,2,3")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--chat", action="store_true",
                   help="require the chat template: fail when the model has none (by default the template is used "
                        "when there is one and the prompt is completed raw otherwise)")
    t.add_argument("--no-chat-template", "--ignore-chat-template", dest="no_chat_template", action="store_true",
                   help="raw completion: encode the prompt as given, without the chat template")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file used instead of the model's")
    p.add_argument("--system", "--system-prompt", dest="system", metavar="TEXT",
                   help="a system message before the prompt (needs a chat template)")
    add_sampling(p)
    p.add_argument("--logprobs", type=non_negative_int, default=None, metavar="N",
                   help="print each generated token's log-probability (log-softmax of the raw logits) and its N "
                        "most likely alternatives, the stop token included: JSON lines when stdout is not a "
                        "terminal ('piece' is the token's own text, 'text' what it added to the output)")


def _refuse_conflicts(args) -> None:
    """Flags that cannot apply together are an error naming both, never silently dropped."""
    if args.tokens is not None:
        for flag, given in (("--chat", args.chat), ("--no-chat-template", args.no_chat_template),
                            ("--chat-template", args.chat_template is not None), ("--system", args.system is not None),
                            ("--stop-string", args.stop_strings is not None)):
            if given:
                raise MlxcError(f"{flag} works on a text --prompt, not on --tokens ids"
                                + ("; use --stop for stop ids" if flag == "--stop-string" else ""))
    if args.no_chat_template:
        if args.system is not None:
            raise MlxcError("--system needs the chat template, but --no-chat-template turns it off")
        if args.chat_template is not None:
            raise MlxcError("--chat-template and --no-chat-template contradict each other: give one")


def _read_prompt(args) -> str | None:
    if args.prompt != "-":
        return args.prompt
    text = sys.stdin.read()
    if not text:
        raise MlxcError("--prompt - read an empty prompt from stdin")
    return text


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise MlxcError(f"--chat-template {path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MlxcError(f"--chat-template {path} is not UTF-8 text") from None


def _prompt_ids(model, args, prompt: str, template: str | None) -> list[int]:
    if model.tokenizer is None:
        raise MlxcError("--prompt needs a tokenizer and this model has none; give --tokens ids instead")
    has_template = template is not None or model.tokenizer.chat_template is not None
    if not has_template and not args.no_chat_template:
        if args.chat:
            raise MlxcError("--chat needs a chat template and this model's tokenizer has none; give --chat-template "
                            "FILE, or drop --chat for raw completion")
        if args.system is not None:
            raise MlxcError("--system needs a chat template and this model's tokenizer has none; give "
                            "--chat-template FILE")
    chat = False if args.no_chat_template else (True if args.chat else None)
    return model.prompt_ids(prompt, chat=chat, system=args.system, chat_template=template)


def _fit_context(model, options: dict, prompt_len: int) -> None:
    """Clip --max-new-tokens so the prompt and the new tokens fit the model's context, saying so on stderr."""
    ctx = model.context_length
    if ctx is None or options["max_kv_size"] is not None:
        return
    room = ctx - prompt_len
    if room <= 0:
        raise MlxcError(f"the prompt has {prompt_len} tokens, which fills the model's context of {ctx}; shorten it "
                        "or give --max-kv-size N to attend to the last N positions only")
    if options["max_new_tokens"] > room:
        note(f"--max-new-tokens {options['max_new_tokens']} clipped to {room}: the prompt ({prompt_len} tokens) and "
             f"the new tokens must fit the model's context of {ctx} (--max-kv-size N lifts this)")
        options["max_new_tokens"] = room


def _report(stats) -> None:
    """What mlx_lm.generate prints after generating, on stderr."""
    import mlx.core as mx

    rate = stats.generation_tps
    note(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
    note(f"Generation: {stats.generation_tokens} tokens, "
         + (f"{rate:.3f} tokens-per-sec" if rate is not None else "- tokens-per-sec (fewer than 2 tokens)"))
    note(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")


class _LogprobPrinter:
    """One record per generated token: JSON lines for programs, an aligned line for a person at a terminal."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.json = not sys.stdout.isatty()

    def _piece(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def __call__(self, token: int, logprob: float, top: list[tuple[int, float]], text: str | None) -> None:
        if self.json:
            record = {"token": token}
            if self.tokenizer is not None:
                record["piece"] = self._piece(token)
            if text is not None:
                record["text"] = text
            record["logprob"] = logprob
            record["top"] = [{"token": t, **({"piece": self._piece(t)} if self.tokenizer else {}), "logprob": lp}
                             for t, lp in top]
            write(json.dumps(record, ensure_ascii=False))
            return

        def show(t: int) -> str:
            return repr(self._piece(t)) if self.tokenizer is not None else str(t)

        alts = "  ".join(f"{show(t)} {lp:.3f}" for t, lp in top)
        write(f"{logprob:9.4f}  {show(token):<16}" + (f"  top: {alts}" if top else ""))


def run(args) -> int:
    import mlx.core as mx

    from ..api import load
    from ..runtime.generate import GenerationStats

    _refuse_conflicts(args)
    template = _read_template(args.chat_template)
    prompt = _read_prompt(args)
    model = load(args.src, **build_options(args), **trust_option(args), progress=progress)
    model.require_causal_lm("mlxc run")
    options = sampling(args)
    stats = GenerationStats()
    show = _LogprobPrinter(model.tokenizer) if args.logprobs is not None else None
    if prompt is not None:
        ids = _prompt_ids(model, args, prompt, template)
        _fit_context(model, options, len(ids))
        for item in model.stream_text(ids, logprobs=args.logprobs, stats=stats, **options):
            if show is not None:
                show(item.token, item.logprob, item.top, item.text)
            else:
                sys.stdout.write(item)
                sys.stdout.flush()
        if show is None:
            sys.stdout.write("\n")
    else:
        del options["stop_strings"]  # refused above when given
        _fit_context(model, options, len(args.tokens))
        first = True
        for step in model.stream(mx.array([args.tokens]), logprobs=args.logprobs, stats=stats, **options):
            if show is not None:
                top = list(zip(step.top_tokens[0].tolist(), step.top_logprobs[0].tolist()))
                show(step.tokens[0].item(), step.logprobs[0].item(), top, None)
                continue
            sys.stdout.write(("" if first else ",") + str(step[0].item()))
            sys.stdout.flush()
            first = False
        if show is None:
            sys.stdout.write("\n")
    _report(stats)
    return 0
