"""A loaded model: the generated module with its weights, plus caches, loss, generation and the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..ir import Program
from ..ir.errors import MlxcError
from .loss import causal_lm_loss


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
        self.vocab_size = program.main.outputs[0].type.shape[-1]

    def __repr__(self) -> str:
        return f"CompiledModel(source={self.source!r}, module={self.module_path!r})"

    @property
    def dtype(self) -> str:
        """The compute dtype (of the weights and activations), e.g. `float16`."""
        return {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[self.program.main.outputs[0].type.dtype.value]

    @property
    def context_length(self) -> int | None:
        """The most positions the model was built for (`max_position_embeddings`), when the spec says."""
        return self.spec.max_position_embeddings if self.spec is not None else None

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
        ids = self.check_ids(input_ids)
        logits = self.net(ids, cache)
        loss = None
        if labels is not None:
            labels = mx.array(labels) if not isinstance(labels, mx.array) else labels
            if labels.ndim == 1:
                labels = labels[None]
            if labels.shape != ids.shape:
                raise MlxcError(f"labels shape {list(labels.shape)} does not match input ids {list(ids.shape)}")
            loss = causal_lm_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss)

    def step(self, ids: mx.array, cache) -> mx.array:
        return self.net(ids, cache)

    def make_cache(self) -> list:
        from .cache import make_caches

        return make_caches(list(self.module.CACHE_WINDOWS))

    # ------------------------------------------------------------------ generation

    def stop_tokens(self, override: Sequence[int] | None = None) -> tuple[int, ...]:
        """The given stop ids, else the tokenizer's end-of-sequence ids, else the spec's."""
        if override is not None:
            return tuple(override)
        stops = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or ())
        if not stops and self.spec is not None:
            stops = tuple(self.spec.eos_token_ids)
        return stops

    def _sampling(self, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens):
        from .sampling import SamplingParams

        return SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            seed=seed, stop_tokens=self.stop_tokens(stop_tokens),
        )

    def stream(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_tokens: Sequence[int] | None = None, cache=None, min_p: float = 0.0) -> Iterator[mx.array]:
        """Yield one [batch] array of new token ids per step."""
        from .generate import generate_stream

        ids = self.check_ids(input_ids)
        params = self._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens)
        cache = self.make_cache() if cache is None else cache
        yield from generate_stream(self.step, ids, cache, max_new_tokens, params, vocab_size=self.vocab_size)

    def generate(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_tokens: Sequence[int] | None = None, min_p: float = 0.0) -> mx.array:
        """Prompt followed by up to `max_new_tokens` new ids, [batch, prompt + new]."""
        from .generate import generate

        ids = self.check_ids(input_ids)
        params = self._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens)
        out = generate(self.step, ids, self.make_cache(), max_new_tokens, params, vocab_size=self.vocab_size)
        return out.astype(ids.dtype)

    # ------------------------------------------------------------------ text

    def generate_text(self, prompt: str, chat: bool = False, **kwargs) -> Iterator[str]:
        """Stream decoded text for a prompt (rendered through the chat template when `chat`)."""
        tok = self._tokenizer()
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(prompt)
        yield from self.stream_text(ids, **kwargs)

    def stream_text(self, ids: Sequence[int], generated: list[int] | None = None, **kwargs) -> Iterator[str]:
        """Text pieces of the continuation of `ids`, stopping at (and not showing) a stop token. Every sampled id,
        the stop token included, is appended to `generated` when given."""
        tok = self._tokenizer()
        decoder = tok.stream_decoder()
        stops = set(self.stop_tokens(kwargs.get("stop_tokens")))
        for step in self.stream(mx.array([list(ids)]), **kwargs):
            t = step[0].item()
            if generated is not None:
                generated.append(t)
            if t in stops:
                break
            piece = decoder.add(t)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def _tokenizer(self):
        if self.tokenizer is None:
            raise MlxcError("this model has no tokenizer; pass token ids instead")
        return self.tokenizer
