"""Multi-turn chat that keeps the model's state between turns: each turn feeds only the tokens the cache lacks.

When the new prompt diverges from what the cache holds, the cache has to forget its tail: KV states trim; a
recurrent state (Mamba, RNNs) cannot, so the turn is recomputed from the start instead — never trimmed silently.
"""

from __future__ import annotations

from typing import Iterator

from ..ir.errors import MlxcError


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with a model. The chat template is re-rendered every turn; the longest prefix already in the
    cache is reused, so a turn costs its own tokens, not the whole history."""

    def __init__(self, model, system: str | None = None, *, chat_template: str | None = None,
                 max_kv_size: int | None = None, **sampling):
        """`chat_template` replaces the tokenizer's; `max_kv_size` bounds the cache (old turns fall out of
        attention); the rest (`max_new_tokens`, `temperature`, `stop_strings`, ...) goes to `stream_text`."""
        if model.tokenizer is None:
            raise MlxcError("chat needs a tokenizer; this model has none")
        self.template = chat_template if chat_template is not None else model.tokenizer.chat_template
        if self.template is None:
            raise MlxcError("chat needs a chat template and this model's tokenizer has none; give one "
                            "(--chat-template FILE, or chat_template=)")
        if "logprobs" in sampling:
            raise MlxcError("a chat session streams text; logprobs are not available here")
        if sampling.get("stop_tokens") is not None:  # fail now, not after the user typed the first message
            from .generate import check_stop_tokens

            check_stop_tokens(model.stop_tokens(sampling["stop_tokens"]), model.vocab_size)
        from .model import _StopStrings

        _StopStrings(sampling.get("stop_strings"))
        self.model = model
        self.sampling = sampling
        self.max_kv_size = max_kv_size
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache = model.make_cache(max_kv_size)
        self.cached: list[int] = []  # the token ids the cache holds, in order
        self.reused = 0  # tokens of the last prompt served from the cache

    def _rewind(self, keep: int) -> int:
        """Drop cached tokens past `keep`; returns how many cached tokens remain (0 if the cache had to restart:
        a recurrent state, or a sliding window that no longer holds what the next query would see)."""
        drop = len(self.cached) - keep
        if drop > 0:
            if self.cache.can_rewind(drop):
                self.cache.rewind(drop)
            else:
                self.cache, keep = self.model.make_cache(self.max_kv_size), 0
        self.cached = self.cached[:keep]
        return keep

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces."""
        tok = self.model.tokenizer
        self.messages.append({"role": "user", "content": text})
        text = tok.apply_chat_template(self.messages, add_generation_prompt=True, chat_template=self.template)
        ids = tok.encode(text, add_special_tokens=False)
        keep = _common_prefix(ids, self.cached)
        if keep == len(ids):  # always feed at least one token so there are logits to sample from
            keep -= 1
        keep = self.reused = self._rewind(keep)
        generated: list[int] = []
        reply: list[str] = []
        finished = False
        try:
            for piece in self.model.stream_text(ids[keep:], generated, cache=self.cache, context=ids[:keep],
                                                **self.sampling):
                reply.append(piece)
                yield piece
            finished = True
        finally:
            # Also when the caller stops reading: the cache then holds the prompt and every generated token but the
            # last, and the reply is the text shown (cut at a stop string), which the next turn's template renders.
            if generated:
                self.cached = ids + generated[:-1]
            if generated or finished:
                self.messages.append({"role": "assistant", "content": "".join(reply)})
            else:  # failed before generating: the turn did not happen
                self.messages.pop()
