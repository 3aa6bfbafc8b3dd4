"""Tokenizer for the runtime: the `tokenizers` library plus the bits of transformers' behaviour generation needs.

It reproduces what transformers 5 does with a saved fast tokenizer, without importing transformers:
- encoding and decoding go straight to `tokenizers` (the `post_processor` in tokenizer.json decides whether BOS/EOS
  are added; transformers ignores `add_bos_token` in tokenizer_config.json when tokenizer.json exists, except that we
  honour it when tokenizer.json has no post-processor at all);
- the chat template comes from `chat_template.jinja` (what transformers 5 writes), else `chat_template.json`, else
  the `chat_template` entry of tokenizer_config.json, and is rendered with the same Jinja environment settings.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from mlxc.ir.errors import MlxcError

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as plain strings or as serialized AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MlxcError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise MlxcError(f"{path} is not UTF-8 text") from None
    except RecursionError:
        raise MlxcError(f"{path} is not valid JSON: nested too deep") from None
    if not isinstance(data, dict):
        raise MlxcError(f"{path} should hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------------- Jinja


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by templates for assistant masks) and renders the body
    unchanged; without it such templates would not even parse."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace` minus underscore-prefixed attributes, so templates cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and '\''; chat templates expect raw JSON.
    if len(str(indent)) > 64 or (isinstance(indent, int) and indent > 64) or len(str(separators)) > 64:
        raise TemplateLimit("the template's tojson asks for an indent or separators beyond what a prompt needs")
    return _check_sized(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                   sort_keys=sort_keys))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Limits on what a chat template may do. A template is code from a file someone else wrote: the sandbox (below)
# keeps it away from Python's internals; these keep it from exhausting the machine. Real templates render a prompt
# in milliseconds and never come near them.
TEMPLATE_SECONDS = 10.0  # compiling plus rendering one template
TEMPLATE_CHARS = 1 << 24  # the longest string (and the longest output) a template may build: 16 Mi characters
TEMPLATE_ITEMS = 1 << 20  # the longest list or tuple it may build by repetition or concatenation
TEMPLATE_SOURCE = 1 << 20  # the largest template source accepted
_BIG_NUMBER = re.compile(r"\d{8,}")  # a width or precision of 10**7 or more in a format string
_NESTED_FIELD = re.compile(r"\{[^{}]*:[^{}]*\{")  # `{:{w}}`: a width taken from the arguments


class TemplateLimit(jinja2.exceptions.SecurityError):
    """A chat template went past one of the limits above."""


class TemplateTimeout(Exception):
    """A chat template ran past TEMPLATE_SECONDS (raised in the rendering thread by `_Deadline`)."""


def _check_sized(value: Any) -> Any:
    if isinstance(value, str) and len(value) > TEMPLATE_CHARS:
        raise TemplateLimit(f"the template built a string of {len(value)} characters (at most {TEMPLATE_CHARS})")
    if isinstance(value, (list, tuple)) and len(value) > TEMPLATE_ITEMS:
        raise TemplateLimit(f"the template built a list of {len(value)} items (at most {TEMPLATE_ITEMS})")
    return value


def _check_numbers(args: Iterable[Any]) -> None:
    """No integer argument may be large enough to ask for a huge allocation in one C call (`'x'.center(10**9)`,
    `(1).to_bytes(10**9)`, `lipsum(10**9)`)."""
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_CHARS:
            raise TemplateLimit(f"the template passed {a}, a size beyond what a prompt needs")


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, bytes)) else 0


def _check_format(fmt: Any, args: Any) -> None:
    """`%` formatting and `.format` with a huge width or precision would pad in one C call: refuse one written in
    the format string, and one taken from the arguments (`%*d`, `{:{}}`)."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    if not isinstance(fmt, str):
        return
    if _BIG_NUMBER.search(fmt):
        raise TemplateLimit("the template's format string asks for a width or precision beyond what a prompt needs")
    if "*" in fmt or _NESTED_FIELD.search(fmt):
        values = args.values() if isinstance(args, Mapping) else args if isinstance(args, (list, tuple)) else [args]
        _check_numbers(values)


def _bounded_join(parts: Iterable[Any], sep: str = "", convert: bool = True) -> str:
    """`str.join` that refuses before building a string longer than TEMPLATE_CHARS (`convert`: str() each part,
    as the `join` filter and `~` do; else a part that is not a string is Python's TypeError)."""
    parts = [p if isinstance(p, str) or not convert else str(p) for p in parts]
    if not all(isinstance(p, str) for p in parts):
        raise TypeError("sequence item: expected str instance")
    if sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0) > TEMPLATE_CHARS:
        raise TemplateLimit(f"the template joined strings into more than {TEMPLATE_CHARS} characters")
    return sep.join(parts)


def _check_string_method(s: str | bytes, name: str, args: tuple, kwargs: dict) -> None:
    """The string methods whose result can outgrow their inputs many times over, bounded before they run."""
    if name == "replace" and len(args) >= 2 and isinstance(args[0], type(s)) and isinstance(args[1], type(s)):
        old, new = args[0], args[1]
        hits = s.count(old) if old else len(s) + 1
        grown = len(s) + hits * max(len(new) - len(old), 0)
    elif name == "expandtabs":
        size = (args[0] if args else kwargs.get("tabsize", 8))
        grown = len(s) + s.count("\t" if isinstance(s, str) else b"\t") * (size if isinstance(size, int) else 0)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        widest = max((len(v) if isinstance(v, (str, bytes)) else 1 for v in args[0].values()), default=1)
        grown = len(s) * widest
    else:
        return
    if grown > TEMPLATE_CHARS:
        raise TemplateLimit(f"the template's {name} would build more than {TEMPLATE_CHARS} characters")


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles `a ~ b` (string concatenation, which the sandbox does not intercept) to a call that checks the
    result's length first, so doubling a string in a recursive macro stops at TEMPLATE_CHARS."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _bounded_filter(f):
    """A built-in filter whose arguments (not the value) are checked like a call's."""
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_numbers(list(args[1:]) + list(kwargs.values()))
        return _check_sized(f(*args, **kwargs))
    return checked


def _join_filter(eval_ctx, value, d: str = "", attribute=None):
    if attribute is not None:
        get = jinja2.filters.make_attrgetter(eval_ctx.environment, attribute)
        value = [get(v) for v in value]
    return _bounded_join(value, str(d))


def _replace_filter(eval_ctx, s, old, new, count=None):
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    if count is not None:
        _check_numbers([count])
        hits = min(hits, max(count, 0)) if count >= 0 else hits
    if len(s) + hits * max(len(new) - len(old), 0) > TEMPLATE_CHARS:
        raise TemplateLimit(f"the template's replace would build more than {TEMPLATE_CHARS} characters")
    return s.replace(old, new) if count is None else s.replace(old, new, count)


def _format_filter(value, *args, **kwargs):
    _check_format(value, list(args) + list(kwargs.values()))
    return _check_sized(jinja2.filters.do_format(value, *args, **kwargs))


def _sum_filter(environment, iterable, attribute=None, start=0):
    items = list(iterable) if attribute is None else [environment.getattr(x, attribute) for x in iterable]
    if isinstance(start, (list, tuple)) and sum(map(_length, items)) + len(start) > TEMPLATE_ITEMS:
        raise TemplateLimit(f"the template's sum would build a list of more than {TEMPLATE_ITEMS} items")
    return jinja2.filters.do_sum(environment, items, start=start)


_SIZED_FILTERS = ("center", "indent", "wordwrap", "truncate", "batch", "slice")  # their arguments are sizes
_join_filter = jinja2.pass_eval_context(_join_filter)
_replace_filter = jinja2.pass_eval_context(_replace_filter)
_sum_filter = jinja2.pass_environment(_sum_filter)


def _dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


# mlxc's own globals (transformers' set): they allocate nothing a size argument could inflate
_TRUSTED_GLOBALS: Final = {"raise_exception": _raise_exception, "strftime_now": _strftime_now, "dict": _dict,
                           "namespace": _Namespace}
_TRUSTED_CALLS: Final = tuple(_TRUSTED_GLOBALS.values())


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox (no attributes that start with `_`, no mutation of lists and dicts) plus limits on
    size: arithmetic that repeats or concatenates, calls, filters and `~` are checked before they allocate."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and not isinstance(times, bool) and isinstance(seq, (str, list, tuple, bytes)):
                limit = TEMPLATE_CHARS if isinstance(seq, (str, bytes)) else TEMPLATE_ITEMS
                if len(seq) * times > limit:
                    raise TemplateLimit(f"the template repeats a sequence of {len(seq)} {times} times "
                                        f"(at most {limit} items)")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                    right * max(abs(left).bit_length(), 1) > 4096:
                raise TemplateLimit("the template raises to a power with more than 4096 bits")
        elif operator == "%" and isinstance(left, (str, bytes)):
            _check_format(left, right)
        elif operator == "+" and _length(left) + _length(right) > (
                TEMPLATE_CHARS if isinstance(left, (str, bytes)) else TEMPLATE_ITEMS):
            raise TemplateLimit("the template concatenates past the longest string or list it may build")
        return _check_sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's names
        if not (isinstance(__obj, jinja2.runtime.Macro) or any(__obj is t for t in _TRUSTED_CALLS)
                or getattr(__obj, "checks_itself", False)):  # data passes freely
            _check_numbers(list(args) + list(kwargs.values()))
        target, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(target, (str, bytes)):
            if name == "join" and isinstance(target, str) and len(args) == 1 and not kwargs:
                return _bounded_join(args[0], target, convert=False)
            _check_string_method(target, name, args, kwargs)
        return _check_sized(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:
        """`str.format` / `format_map` as the sandbox runs them, with the widths checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            values = list(args) + list(kwargs.values())
            _check_format(fmt, [v for a in values for v in (a.values() if isinstance(a, Mapping) else [a])])
            return _check_sized(wrapped(*args, **kwargs))
        checked.checks_itself = True  # `call` leaves its arguments to it: they are values, not sizes
        return checked

    @staticmethod
    def bounded_concat(parts: Iterable[Any]) -> str:
        return _bounded_join(parts)


class _Deadline:
    """Interrupts this thread's Python code once `seconds` have passed: a template looping over nested `range`s
    (each within the sandbox's MAX_RANGE) could otherwise run for hours. A timer thread raises `TemplateTimeout`
    in it asynchronously (the way a debugger interrupts), so rendering costs nothing extra; a timeout that lands
    just as the template finishes still counts as one."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self) -> "_Deadline":
        self.thread, self.armed, self.fired = threading.get_ident(), True, False
        self.lock = threading.Lock()
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def _fire(self) -> None:
        with self.lock:
            if self.armed:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread),
                                                           ctypes.py_object(TemplateTimeout))

    def __exit__(self, kind: Any, *rest: Any) -> None:
        with self.lock:
            self.armed = False
            self.timer.cancel()
            if self.fired and kind is None:  # fired but not delivered yet: take it back, and report it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread), None)
                raise TemplateTimeout()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured the way transformers configures it, plus size and time
    limits (see `_ChatSandbox`, `_Deadline`)."""
    if len(template) > TEMPLATE_SOURCE:
        raise MlxcError(f"chat template is {len(template)} characters long (at most {TEMPLATE_SOURCE} are accepted)")
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols],
                       optimized=False)  # no constant folding: filters run at render time, under the limits
    env.filters.update({name: _bounded_filter(env.filters[name]) for name in _SIZED_FILTERS})
    env.filters.update(tojson=_tojson, join=_join_filter, replace=_replace_filter, format=_format_filter,
                       sum=_sum_filter)
    env.globals.update(_TRUSTED_GLOBALS)
    try:
        with _Deadline(TEMPLATE_SECONDS):
            return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise MlxcError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None
    except (TemplateLimit, TemplateTimeout, RecursionError, MemoryError) as e:
        raise MlxcError(f"chat template cannot be compiled: {_template_error(e)}") from None


def _template_error(e: BaseException) -> str:
    if isinstance(e, TemplateTimeout):
        return f"it ran for more than {TEMPLATE_SECONDS:g} s"
    if isinstance(e, RecursionError):
        return "it nests or recurses too deeply"
    if isinstance(e, MemoryError):
        return "it needs more memory than this machine has"
    return str(e) or type(e).__name__


def _render(template: str, **variables: Any) -> str:
    """Render within the limits: the output is collected piece by piece and refused past TEMPLATE_CHARS."""
    compiled = _compile(template)
    pieces, total = [], 0
    with _Deadline(TEMPLATE_SECONDS):
        for piece in compiled.generate(**variables):
            total += len(piece)
            if total > TEMPLATE_CHARS:
                raise TemplateLimit(f"the template's output passed {TEMPLATE_CHARS} characters")
            pieces.append(piece)
    return "".join(pieces)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types; anything else becomes an inert `<TypeName>` string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars
    return f"<{type(value).__name__}>"


# ------------------------------------------------------------------------------------------------------ Tokenizer


class Tokenizer:
    """Text <-> token ids, chat templating and streaming detokenization for generation."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | Sequence[str] | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`. Special tokens are given as strings and must be in its vocabulary.

        `eos_token` may list several strings (the first is the one chat templates see); `extra_eos_token_ids`
        adds more stop ids (e.g. from generation_config.json). `add_bos_token`/`add_eos_token` only apply when
        the tokenizer has no post-processor, since one that exists already decides that.
        """
        self._tok = tokenizer
        eos_list = [eos_token] if isinstance(eos_token, str) else list(eos_token or [])
        self.bos_token = bos_token
        self.eos_token = eos_list[0] if eos_list else None
        self.chat_template = chat_template
        named = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        if bos_token is not None:
            named["bos_token"] = bos_token
        if self.eos_token is not None:
            named["eos_token"] = self.eos_token
        self.special_tokens_map: dict[str, str] = named
        self.bos_token_id = self._required_id(bos_token, "bos_token") if bos_token is not None else None
        ids = [self._required_id(t, "eos_token") for t in eos_list] + [int(i) for i in extra_eos_token_ids]
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))
        has_post = tokenizer.post_processor is not None
        self._prepend_bos = add_bos_token and not has_post and self.bos_token_id is not None
        self._append_eos = add_eos_token and not has_post and bool(eos_list)

    def _required_id(self, token: str, what: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise MlxcError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return i

    @classmethod
    def from_parts(cls, parts) -> Tokenizer:
        """From a frontend's description (e.g. `frontends.gguf.TokenizerParts` read from GGUF metadata)."""
        return cls(parts.tokenizer, bos_token=parts.bos_token, eos_token=parts.eos_token,
                   chat_template=parts.chat_template, special_tokens=parts.special_tokens,
                   add_bos_token=parts.add_bos_token, add_eos_token=parts.add_eos_token)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer saved by transformers (tokenizer.json + tokenizer_config.json + chat template files)."""
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise MlxcError(f"no tokenizer.json in {d}; mlxc needs a fast (tokenizers) tokenizer file")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise MlxcError(f"could not load {tj}: {e}") from None
        config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        legacy = _read_json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}
        special = {name: _token_text(config.get(name, legacy.get(name))) for name in _SPECIAL_NAMES}

        extra_eos: list[int] = []
        if (d / "generation_config.json").is_file():
            eid = _read_json(d / "generation_config.json").get("eos_token_id")
            listed = eid if isinstance(eid, list) else [eid]
            extra_eos = [i for i in listed if isinstance(i, int) and not isinstance(i, bool)]

        return cls(
            tok,
            bos_token=special.pop("bos_token"),
            eos_token=special.pop("eos_token"),
            chat_template=cls._find_chat_template(d, config),
            special_tokens=special,
            extra_eos_token_ids=extra_eos,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
        )

    def save(self, directory: str | Path) -> list[str]:
        """Write the files `from_dir` reads back (tokenizer.json, tokenizer_config.json, chat template, stop ids)."""
        d = Path(directory)
        self._tok.save(str(d / "tokenizer.json"))
        config: dict[str, Any] = dict(self.special_tokens_map)
        config["add_bos_token"] = self._prepend_bos
        config["add_eos_token"] = self._append_eos
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        written = ["tokenizer.json", "tokenizer_config.json"]
        if self.chat_template is not None:
            (d / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            written.append("chat_template.jinja")
        if len(self.eos_token_ids) > 1:
            (d / "generation_config.json").write_text(json.dumps({"eos_token_id": self.eos_token_ids}) + "\n")
            written.append("generation_config.json")
        return written

    @staticmethod
    def _find_chat_template(d: Path, config: Mapping[str, Any]) -> str | None:
        """Same priority as transformers: the .jinja file, then chat_template.json, then the config entry."""
        if (d / "chat_template.jinja").is_file():
            return (d / "chat_template.jinja").read_text(encoding="utf-8")
        template: Any = None
        if (d / "chat_template.json").is_file():
            template = _read_json(d / "chat_template.json").get("chat_template")
        if template is None:
            template = config.get("chat_template")
        if isinstance(template, list):  # legacy multi-template format: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    # --------------------------------------------------------------------------------------------- encode/decode

    @property
    def vocab_size(self) -> int:
        """Size of the id space, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise MlxcError(f"encode expects a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self._prepend_bos and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id, *ids]
            if self._append_eos:
                ids = [*ids, self.eos_token_ids[0]]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise MlxcError(f"token id {i} out of range for vocabulary of {n}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamingDecoder:
        return StreamingDecoder(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt string, as transformers' `apply_chat_template(tokenize=False)`.

        Extra keyword arguments become template variables (e.g. `enable_thinking=False`). Encode the result with
        `add_special_tokens=False`: templates usually write the BOS token themselves.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise MlxcError("this tokenizer has no chat template; pass chat_template= or format the prompt yourself")
        if not messages:
            raise MlxcError("cannot apply a chat template to an empty conversation")
        try:
            plain = [_plain(m) if isinstance(m, Mapping) else m for m in messages]
            tools, documents, kwargs = _plain(tools), _plain(documents), _plain(kwargs)
        except RecursionError:
            raise MlxcError("chat messages (or tools, documents) are nested too deeply") from None
        chat = []
        for m in plain:
            if not isinstance(m, Mapping):
                raise MlxcError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
            msg = {k: v for k, v in m.items() if v is not None}
            reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
            if reasoning is not None:  # templates read `reasoning_content` (gpt-oss ones `thinking`)
                msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
            chat.append(msg)
        variables = {**self.special_tokens_map, **kwargs}
        try:
            return _render(template, messages=chat, tools=tools, documents=documents,
                           add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise MlxcError(f"chat template rejected the conversation: {e}") from None
        except TemplateTimeout:
            raise MlxcError(f"chat template ran for more than {TEMPLATE_SECONDS:g} s; it was stopped") from None
        except Exception as e:  # the template's own code failed (1/0, a type error, recursion): its fault, not ours
            raise MlxcError(f"chat template failed: {type(e).__name__}: {_template_error(e)}") from None


class StreamingDecoder:
    """Turns tokens arriving one at a time into text deltas whose concatenation equals `decode(all_tokens)`.

    A byte-level token can hold part of a UTF-8 character, and some decoders depend on neighbouring tokens (e.g. a
    leading-space marker), so a token cannot be decoded alone. We decode a short window starting a little before the
    new tokens and emit only the text past what the window's older part already produced, holding back while the
    result ends in U+FFFD (an incomplete character). `flush()` emits whatever is held back at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix = 0  # window start: tokens before it have been fully emitted
        self._read = 0  # tokens before it are accounted for in the text emitted so far
        self.text = ""

    def add(self, token: int | Iterable[int]) -> str:
        """Add one token id (or several) and return the new text that is now certain, possibly ''."""
        if hasattr(token, "tolist"):  # mx / numpy arrays and scalars
            token = token.tolist()
        if isinstance(token, Iterable):
            self.tokens.extend(int(t) for t in token)
        else:
            self.tokens.append(int(token))
        prefix_text = self._tokenizer.decode(self.tokens[self._prefix : self._read], self._skip)
        new_text = self._tokenizer.decode(self.tokens[self._prefix :], self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.tokens)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Emit everything still held back (invalid trailing bytes come out as U+FFFD); call at end of stream."""
        prefix_text = self._tokenizer.decode(self.tokens[self._prefix : self._read], self._skip)
        new_text = self._tokenizer.decode(self.tokens[self._prefix :], self._skip)
        delta = new_text[len(prefix_text) :]
        self._prefix = self._read = len(self.tokens)
        self.text += delta
        return delta
