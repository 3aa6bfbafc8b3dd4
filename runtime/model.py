"""A loaded model: the generated module with its weights, plus caches, loss, generation and the tokenizer."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..ir import Program
from ..ir.attrs import RopeKind
from ..ir.errors import MlxcError
from .loss import (IGNORE_INDEX, SINGLE_LABEL, causal_lm_loss, problem_of, sequence_classification_loss,
                   token_classification_loss)

CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION = "causal_lm", "sequence_classification", \
    "token_classification"


@dataclass
class ModelOutput:
    logits: mx.array
    loss: Optional[mx.array] = None


class CompiledModel:
    """What `mlxc.load` returns. `model(ids)` runs a forward pass; `model.generate` decodes with a KV cache."""

    def __init__(self, module: ModuleType, net: nn.Module, program: Program, *, spec=None, tokenizer=None,
                 source: str = "", module_path: str = "", lora_config=None):
        self.module = module
        self.net = net
        self.program = program
        self.spec = spec
        self.tokenizer = tokenizer
        self.source = source
        self.module_path = module_path
        self.lora_config = lora_config  # the adapters' configuration, when the model has LoRA adapters
        head = getattr(spec, "head", None)
        # what @main computes: `causal_lm` (next-token logits) unless the spec says it has a task head
        self.head_kind: str = head.kind.value if head is not None else CAUSAL_LM
        self.problem_type: str | None = head.problem_type.value if getattr(head, "problem_type", None) else None
        self.num_labels: int | None = None if self.head_kind == CAUSAL_LM else program.main.outputs[0].type.shape[-1]
        self.vocab_size = _vocabulary(program)
        # whether @main takes `logits_to_keep` (an artifact compiled before it did computes every position)
        self.keeps_logits = any(v.name == Program.LOGITS_TO_KEEP for v in program.main.inputs)
        pools = [o for o in program.main.ops if o.op == "pool"]
        self._pool = pools[0].attrs if pools else None  # mode and pad_token_id of a pooling head

    def __repr__(self) -> str:
        return f"CompiledModel(source={self.source!r}, module={self.module_path!r})"

    @property
    def dtype(self) -> str:
        """The compute dtype (of the weights and activations), e.g. `float16`."""
        return {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[self.program.main.outputs[0].type.dtype.value]

    @property
    def context_length(self) -> int | None:
        """The most positions the model was built for (`max_position_embeddings`), when the spec says. None for dynamic
        NTK rope, which rescales its frequencies to run past that length (what it is for)."""
        if self.spec is None or self.spec.rope.kind == RopeKind.DYNAMIC:
            return None
        return self.spec.max_position_embeddings

    # ------------------------------------------------------------------ forward

    def check_ids(self, ids) -> mx.array:
        ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise MlxcError(f"token ids must be [batch, seq], got shape {list(ids.shape)}")
        if ids.size == 0:
            raise MlxcError("token ids are empty")
        if mx.issubdtype(ids.dtype, mx.floating):
            raise MlxcError(f"token ids must be integers, got {ids.dtype}")
        lo, hi = mx.min(ids).item(), mx.max(ids).item()
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise MlxcError(f"token id {bad} out of range for vocabulary of {self.vocab_size}")
        return ids.astype(mx.int32)

    def __call__(self, input_ids, labels=None, cache=None) -> ModelOutput:
        """Logits of the model's head (`[B, T, vocab]`, `[B, num_labels]` pooled, or `[B, T, num_labels]`) and,
        given labels, its loss: next-token cross-entropy for a causal LM, transformers' task losses otherwise."""
        ids = self.check_ids(input_ids)
        if self._pool is not None:
            self._check_pooling(ids, cache)
        logits = self.forward(ids, cache)
        loss = None if labels is None else self.loss(logits, labels, ids)
        return ModelOutput(logits=logits, loss=loss)

    def forward(self, ids: mx.array, cache=None, logits_to_keep: int = 0) -> mx.array:
        """The generated module on checked ids: tokens start at the position `cache` holds (0 without one), and the
        cache then holds them too. `logits_to_keep=n` computes the head at the last n positions only (0: all), as
        transformers' argument of that name: a prompt step in generation needs one."""
        try:
            count = -1 if isinstance(logits_to_keep, bool) else operator.index(logits_to_keep)
        except TypeError:
            count = -1
        if count < 0:
            raise MlxcError(f"logits_to_keep must be an integer >= 0 (0 keeps every position), got {logits_to_keep!r}")
        logits_to_keep = count
        keep = {}
        if logits_to_keep:
            if self.keeps_logits:
                keep = {"logits_to_keep": logits_to_keep}
            elif self.head_kind != CAUSAL_LM:
                raise MlxcError(f"logits_to_keep applies to a language-model head; this model has a "
                                f"{self.head_kind.replace('_', '-')} head")
        if cache is None:
            logits = self.net(ids, 0, **keep)
        else:
            offset = getattr(cache, "offset", None)
            if offset is None:
                raise MlxcError("cache= must be a cache from model.make_cache() (it counts the positions it holds)")
            logits = self.net(ids, offset, cache, **keep)
            cache.offset = offset + ids.shape[1]
        if logits_to_keep and not keep:  # a program compiled before @main had the input: the same numbers, later
            logits = logits[:, -logits_to_keep:]
        return logits

    def _check_pooling(self, ids: mx.array, cache) -> None:
        """Pooling sees the whole sequence at once, and needs a pad token to find where a padded row ends."""
        if cache is not None:
            raise MlxcError("a sequence-classification head pools the whole sequence: call it without cache=")
        if self._pool["pad_token_id"] is None and ids.shape[0] > 1:  # transformers refuses this batch too
            raise MlxcError(f"cannot classify a batch of {ids.shape[0]} sequences: the model defines no pad token "
                            "(pad_token_id), so padding cannot be told from text; pass one sequence at a time or "
                            "set pad_token_id in the config")

    def loss(self, logits: mx.array, labels, ids: mx.array) -> mx.array:
        """The head's loss for `labels` (checked against the logits and the label count)."""
        labels = mx.array(labels) if not isinstance(labels, mx.array) else labels
        if self.head_kind == SEQUENCE_CLASSIFICATION:
            labels = labels[None] if labels.ndim == 0 else labels
            loss = sequence_classification_loss(logits, labels, self.problem_type)
            if problem_of(self.problem_type, self.num_labels, labels) == SINGLE_LABEL:
                self._check_classes(labels)
            return loss
        labels = labels[None] if labels.ndim == 1 else labels
        if labels.shape != ids.shape:
            raise MlxcError(f"labels shape {list(labels.shape)} does not match input ids {list(ids.shape)}")
        if self.head_kind == TOKEN_CLASSIFICATION:
            loss = token_classification_loss(logits, labels)
            self._check_classes(labels)
            return loss
        return causal_lm_loss(logits, labels)

    def _check_classes(self, labels: mx.array) -> None:
        """Class ids must name a label (or be ignore_index to skip), as torch's cross-entropy insists."""
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_labels))
        if bad.any().item():
            value = labels.reshape(-1)[mx.argmax(bad.reshape(-1))].item()
            raise MlxcError(f"label {value} is not a class of this {self.num_labels}-label head (class ids are "
                            f"0..{self.num_labels - 1}, or {IGNORE_INDEX} to skip a position)")

    def require_causal_lm(self, what: str = "generation") -> None:
        """Refuse `what` on a model whose head does not predict tokens (a classifier has nothing to generate)."""
        if self.head_kind != CAUSAL_LM:
            kind = self.head_kind.replace("_", "-")
            raise MlxcError(f"{what} needs a causal language-model head, but {self.source or 'this model'} has a "
                            f"{kind} head ({self.num_labels} labels): it scores text and cannot generate; call "
                            "model(ids) for its logits")

    def step(self, ids: mx.array, cache, logits_to_keep: int = 0) -> mx.array:
        """One decoding step: next-token logits for `ids` after what `cache` holds (at the last `logits_to_keep`
        positions only, when given)."""
        if self.head_kind != CAUSAL_LM:
            self.require_causal_lm("decoding (model.step)")
        return self.forward(ids, cache, logits_to_keep)

    def _step_last(self, ids: mx.array, cache) -> mx.array:
        """`step` with the head at the last position only: all that generation samples from."""
        return self.step(ids, cache, logits_to_keep=1)

    def _longrope_restart(self) -> int | None:
        """Where generation restarts the cache, for a model whose spec says transformers does (Phi-3's LongRoPE)."""
        from .generate import longrope_context

        return longrope_context(self.program) if getattr(self.spec, "longrope_cache_restart", False) else None

    def make_cache(self, max_kv_size: int | None = None) -> "ModelCache":
        """Fresh state for every stateful op (the generated module's `make_cache`), empty: the next call's tokens
        start at position 0. `max_kv_size` bounds every KV state to that many positions."""
        from .cache import ModelCache, check_max_kv_size

        check_max_kv_size(max_kv_size)
        make = getattr(self.module, "make_cache", None)
        cache = ModelCache(make(max_kv_size) if make is not None else ())
        cache.max_kv_size = max_kv_size  # bounded: generation may run past the context (see `_room`)
        return cache

    # ------------------------------------------------------------------ generation

    def stop_tokens(self, override: Sequence[int] | None = None) -> tuple[int, ...]:
        """The given stop ids, else the tokenizer's end-of-sequence ids, else the spec's. Default ids the model
        cannot produce (a tokenizer larger than the embedding) are dropped; given ones are checked, not dropped."""
        if override is not None:
            return tuple(override)
        stops = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or ())
        if not stops and self.spec is not None:
            stops = tuple(self.spec.eos_token_ids)
        return tuple(t for t in stops if 0 <= t < self.vocab_size)

    def _sampling(self, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens):
        from .generate import check_stop_tokens
        from .sampling import SamplingParams

        params = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            seed=seed, stop_tokens=self.stop_tokens(stop_tokens),
        )
        check_stop_tokens(params.stop_tokens, self.vocab_size)
        return params

    def _room(self, ids: mx.array, cache, max_new_tokens):
        """`max_new_tokens`, clipped so that what the cache holds, the prompt and the new tokens fit the model's
        context (`max_position_embeddings`): generation stops there, as a stop token would end it. A cache bounded by
        `max_kv_size` lifts the limit (every token then attends to the last N positions), unless positions come from
        a learned table, and so does a model with no positions (no rope, no attention). A prompt that leaves no room
        is an error."""
        ctx = self.context_length
        table = any(o.op == "learned_positions" for fn in self.program.functions for o in fn.ops)
        bounded = getattr(cache, "max_kv_size", None) is not None and not table
        if ctx is None or bounded or isinstance(max_new_tokens, bool) \
                or not isinstance(max_new_tokens, int) or not any(o.op in ("rope", "attention", "qkv_attention") for fn in
                                                                  self.program.functions for o in fn.ops):
            return max_new_tokens
        held = int(getattr(cache, "offset", 0))
        room = ctx - held - ids.shape[1]
        if room <= 0 and max_new_tokens > 0:
            where = f" after the {held} positions the cache holds" if held else ""
            hint = " (its learned position table ends there)" if table else \
                ", or give max_kv_size=N (--max-kv-size N) to attend to the last N positions only"
            raise MlxcError(f"the prompt has {ids.shape[1]} tokens{where}, which fills the model's context of {ctx} "
                            f"positions; shorten it{hint}")
        return max(min(max_new_tokens, room), 0)

    def _cache_for(self, cache, max_kv_size):
        if cache is not None and max_kv_size is not None:
            raise MlxcError("give either cache= or max_kv_size=, not both: a given cache already decides its size")
        return self.make_cache(max_kv_size) if cache is None else cache

    def stream(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_tokens: Sequence[int] | None = None, cache=None, min_p: float = 0.0,
               logprobs: int | None = None, max_kv_size: int | None = None, stats=None, context=None):
        """Yield one [batch] array of new token ids per step, or with `logprobs=N` one `TokenLogprobs` (the ids,
        their log-probabilities under the model and the N most likely alternatives). `max_kv_size` keeps only that
        many positions in the KV cache (each new token attends to at most that many), so generation is unbounded.
        `stats` (a `GenerationStats`) is filled in with prompt and generation timings. `context` are the ids a
        given cache already holds: a LongRoPE model recomputes them when the sequence outgrows its original context.
        Without `max_kv_size` (or a cache made with it) generation stops where the sequence fills the model's context
        length, and a prompt that already fills it is an error (`_room`)."""
        from .generate import generate_stream

        self.require_causal_lm("model.stream")
        ids = self.check_ids(input_ids)
        params = self._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens)
        cache = self._cache_for(cache, max_kv_size)
        max_new_tokens = self._room(ids, cache, max_new_tokens)
        yield from generate_stream(self._step_last, ids, cache, max_new_tokens, params, vocab_size=self.vocab_size,
                                   logprobs=logprobs, stats=stats, recompute_at=self._longrope_restart(),
                                   context=context)

    def generate(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_tokens: Sequence[int] | None = None, min_p: float = 0.0, logprobs: int | None = None,
                 max_kv_size: int | None = None):
        """Prompt followed by up to `max_new_tokens` new ids, [batch, prompt + new]; with `logprobs=N` a
        `Generation` holding those ids plus each new token's log-probability and its top N alternatives. Like
        `stream`, it stops at the model's context length unless `max_kv_size` bounds the cache."""
        from .generate import generate

        self.require_causal_lm("model.generate")
        ids = self.check_ids(input_ids)
        params = self._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens)
        cache = self.make_cache(max_kv_size)
        out = generate(self._step_last, ids, cache, self._room(ids, cache, max_new_tokens), params,
                       vocab_size=self.vocab_size, logprobs=logprobs, recompute_at=self._longrope_restart())
        return out.astype(ids.dtype) if logprobs is None else out

    # ------------------------------------------------------------------ text

    def prompt_ids(self, prompt: str, chat: bool | None = False, system: str | None = None,
                   chat_template: str | None = None) -> list[int]:
        """Token ids for a text prompt. `chat=True` renders it as a user message through the chat template
        (`chat_template`, else the tokenizer's), `chat=None` does so when there is a template and encodes the raw
        text otherwise, `chat=False` encodes the raw text. `system` adds a system message (needs the template)."""
        tok = self._tokenizer()
        if not isinstance(prompt, str):
            raise MlxcError(f"prompt must be a string, got {type(prompt).__name__}")
        if chat is False and chat_template is not None:
            raise MlxcError("chat_template= was given but chat=False asks for the raw prompt")
        template = chat_template if chat_template is not None else tok.chat_template
        use_chat = (template is not None) if chat is None else bool(chat)
        if not use_chat:
            if system is not None:
                raise MlxcError("a system prompt needs the chat template, but the prompt is used raw "
                                f"({'chat=False' if chat is False else 'the tokenizer has no chat template'})")
            return tok.encode(prompt)
        if template is None:
            raise MlxcError("this model's tokenizer has no chat template; pass chat_template= or use chat=False")
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
        return tok.encode(text, add_special_tokens=False)

    def generate_text(self, prompt: str, chat: bool | None = False, system: str | None = None,
                      chat_template: str | None = None, **kwargs) -> Iterator:
        """Stream the decoded continuation of a text prompt (see `prompt_ids` for `chat`, `system` and
        `chat_template`; `stream_text` for the rest, e.g. `stop_strings`, `logprobs`, `max_kv_size`)."""
        self.require_causal_lm("model.generate_text")
        ids = self.prompt_ids(prompt, chat=chat, system=system, chat_template=chat_template)
        yield from self.stream_text(ids, **kwargs)

    def stream_text(self, ids: Sequence[int], generated: list[int] | None = None, *,
                    stop_strings: str | Sequence[str] | None = None, logprobs: int | None = None,
                    **kwargs) -> Iterator:
        """Text pieces of the continuation of `ids`, stopping at (and not showing) a stop token, and just before the
        first stop string, even one spread over several tokens. Every sampled id, the stop token included, is
        appended to `generated` when given.

        With `logprobs=N` it yields a `TextToken` per sampled token instead (the stop token included): the text
        that token added to the output (possibly '' while a character or a possible stop string is incomplete),
        its log-probability and the top N alternatives; the texts concatenate to what the plain stream shows.
        """
        from .generate import TextToken, check_logprobs

        self.require_causal_lm("model.stream_text")
        tok = self._tokenizer()
        matcher = _StopStrings(stop_strings)
        check_logprobs(logprobs, self.vocab_size)
        decoder = tok.stream_decoder()
        stops = set(self.stop_tokens(kwargs.get("stop_tokens")))
        held: TextToken | None = None  # with logprobs, the last record waits until we know whether text follows
        steps = self.stream(mx.array([list(ids)]), logprobs=logprobs, **kwargs)
        try:
            for step in steps:
                t = (step if logprobs is None else step.tokens)[0].item()
                if generated is not None:
                    generated.append(t)
                ended = t in stops
                piece, hit = matcher.push(decoder.flush() if ended else decoder.add(t), final=ended)
                if logprobs is None:
                    if piece:
                        yield piece
                else:
                    if held is not None:
                        yield held
                    top = list(zip(step.top_tokens[0].tolist(), step.top_logprobs[0].tolist()))
                    held = TextToken(piece, t, step.logprobs[0].item(), top)
                if ended or hit:
                    break
            else:
                tail, _ = matcher.push(decoder.flush(), final=True)
                if logprobs is None:
                    if tail:
                        yield tail
                elif held is not None:
                    held = TextToken(held.text + tail, held.token, held.logprob, held.top)
        finally:
            steps.close()  # ends the token stream now, which leaves the cache as its contract says
        if held is not None:
            yield held

    def _tokenizer(self):
        if self.tokenizer is None:
            raise MlxcError("this model has no tokenizer; pass token ids instead")
        return self.tokenizer


class _StopStrings:
    """Holds back text that could be the start of a stop string, and cuts the text just before the first one to be
    completed; how the text arrives in pieces makes no difference."""

    def __init__(self, stops: str | Sequence[str] | None):
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise MlxcError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = stops
        self.pending = ""  # text not shown yet: all of it could still be the start of a stop string

    def push(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Add decoded text; return what can be shown now and whether a stop string was found (then nothing after
        it is ever shown). `final` releases what is held back, since no more text will come."""
        self.pending += delta
        # the stop string completed first wins (as if the text came one character at a time), then the longest
        hits = [(i + len(s), i) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)[1]], ""
            return out, True
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                     if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False


def _vocabulary(program: Program) -> int:
    """The token ids the model accepts: the rows of the embedding table @main looks up (the output width for a
    program without one)."""
    embeds = [o for o in program.main.ops if o.op == "embed"]
    if embeds:
        return embeds[0].operands[1].type.shape[0]
    return program.main.outputs[0].type.shape[-1]
