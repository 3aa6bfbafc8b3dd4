"""Multi-turn chat that keeps the KV cache between turns: each turn feeds only the tokens the cache lacks."""

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

    def __init__(self, model, system: str | None = None, **sampling):
        if model.tokenizer is None or model.tokenizer.chat_template is None:
            raise MlxcError("chat needs a tokenizer with a chat template; this model has none")
        self.model = model
        self.sampling = sampling
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache = model.make_cache()
        self.cached: list[int] = []  # the token ids the cache holds, in order
        self.reused = 0  # tokens of the last prompt served from the cache

    def _rewind(self, keep: int) -> int:
        """Drop cached tokens past `keep`; returns how many cached tokens remain (0 if the cache had to restart)."""
        drop = len(self.cached) - keep
        if drop > 0:
            try:
                for c in self.cache:
                    c.trim(drop)
            except MlxcError:  # a rotating cache may no longer hold what is needed: start over
                self.cache, keep = self.model.make_cache(), 0
        self.cached = self.cached[:keep]
        return keep

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces."""
        tok = self.model.tokenizer
        self.messages.append({"role": "user", "content": text})
        ids = tok.encode(tok.apply_chat_template(self.messages, add_generation_prompt=True), add_special_tokens=False)
        keep = _common_prefix(ids, self.cached)
        if keep == len(ids):  # always feed at least one token so there are logits to sample from
            keep -= 1
        keep = self.reused = self._rewind(keep)
        generated: list[int] = []
        yield from self.model.stream_text(ids[keep:], generated, cache=self.cache, **self.sampling)
        # the cache holds everything fed so far: the prompt and every generated token but the last
        self.cached = ids + generated[:-1]
        stops = set(self.model.stop_tokens(self.sampling.get("stop_tokens")))
        self.messages.append({"role": "assistant", "content": tok.decode([t for t in generated if t not in stops])})
