"""ModelSpec: the architecture of a model, validated and frozen, independent of where it came from.

Every frontend (presets, YAML/JSON specs, Hugging Face configs, GGUF metadata) produces one; `lower.py` turns it into IR.
"""

from __future__ import annotations

import enum
from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..ir.attrs import RopeKind, RopeScaling


class BlockKind(str, enum.Enum):
    """What one layer of the stack is. Hybrids list different kinds per layer."""

    ATTENTION = "attention"  # pre-norm transformer block: attention then FFN


class AttentionType(str, enum.Enum):
    FULL = "full"
    SLIDING_WINDOW = "sliding_window"


class FFNType(str, enum.Enum):
    GATED = "gated"  # down(act(gate(x)) * up(x)): SwiGLU, GeGLU
    DENSE = "dense"  # down(act(up(x)))


class NormType(str, enum.Enum):
    RMS = "rms"
    LAYER = "layer"


class Activation(str, enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU = "relu"


class PositionEmbedding(str, enum.Enum):
    ROPE = "rope"
    NONE = "none"


_MAX_LAYERS = 100_000  # far beyond any real model; a larger count is a malformed config, refused before building
Count = Annotated[int, Field(strict=True, gt=0)]  # "3" or 3.0 in a config is a mistake to report, not to coerce
TokenId = Annotated[int, Field(strict=True, ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class RopeSpec(_Frozen):
    theta: float = Field(10000.0, gt=0)
    kind: RopeKind = RopeKind.DEFAULT
    factor: float = Field(1.0, gt=0)
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True

    def scaling(self, max_position_embeddings: int) -> RopeScaling:
        """The IR attribute for this rope; `dynamic` measures against max_position_embeddings as transformers does."""
        original = self.original_max_position_embeddings or max_position_embeddings
        if self.kind == RopeKind.DYNAMIC:
            original = max_position_embeddings
        return RopeScaling(
            kind=self.kind,
            factor=self.factor,
            low_freq_factor=self.low_freq_factor,
            high_freq_factor=self.high_freq_factor,
            original_max_position_embeddings=original if self.kind != RopeKind.DEFAULT else 0,
            beta_fast=self.beta_fast,
            beta_slow=self.beta_slow,
            attention_factor=self.attention_factor,
            mscale=self.mscale,
            mscale_all_dim=self.mscale_all_dim,
            truncate=self.truncate,
        )


class LayerSpec(_Frozen):
    block: BlockKind = BlockKind.ATTENTION
    attention: AttentionType = AttentionType.FULL


class ModelSpec(_Frozen):
    """A decoder-only language model. Sizes are the checkpoint's; derived values are properties."""

    name: str = "model"
    family: str = "llama"
    vocab_size: Count
    hidden_size: Count
    intermediate_size: Count
    num_layers: Count
    num_heads: Count
    num_kv_heads: Optional[Count] = None
    head_dim: Optional[Count] = None
    max_position_embeddings: Count = 4096
    norm: NormType = NormType.RMS
    norm_eps: float = Field(1e-5, gt=0)
    ffn: FFNType = FFNType.GATED
    activation: Activation = Activation.SILU
    position: PositionEmbedding = PositionEmbedding.ROPE
    rope: RopeSpec = RopeSpec()
    attention_bias: bool = False
    attention_out_bias: Optional[bool] = None  # defaults to attention_bias
    mlp_bias: bool = False
    sliding_window: Optional[Count] = None
    layers: tuple[LayerSpec, ...] = ()
    tie_word_embeddings: bool = False
    bos_token_id: Optional[TokenId] = None
    eos_token_ids: tuple[TokenId, ...] = ()
    pad_token_id: Optional[TokenId] = None

    @model_validator(mode="before")
    @classmethod
    def _fill_layers(cls, data):
        """An empty `layers` means every layer is a full-attention block (sliding-window if a window is set).

        Only a well-formed count is expanded; anything else is left for field validation to report by name."""
        count = data.get("num_layers") if isinstance(data, dict) else None
        if isinstance(count, int) and not isinstance(count, bool) and 0 < count <= _MAX_LAYERS and not data.get("layers"):
            kind = AttentionType.SLIDING_WINDOW if data.get("sliding_window") else AttentionType.FULL
            data = {**data, "layers": tuple(LayerSpec(attention=kind) for _ in range(data["num_layers"]))}
        return data

    @model_validator(mode="after")
    def _check(self):
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim"
            )
        if len(self.layers) != self.num_layers:
            raise ValueError(f"layers lists {len(self.layers)} entries but num_layers is {self.num_layers}")
        if any(l.attention == AttentionType.SLIDING_WINDOW for l in self.layers) and not self.sliding_window:
            raise ValueError("a layer uses sliding-window attention but sliding_window is not set")
        if self.position == PositionEmbedding.ROPE and self.dim_per_head % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.dim_per_head}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def attention_kind(self) -> str:
        """MHA, GQA or MQA, from the head counts."""
        if self.kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.kv_heads == 1 else "GQA"

    @property
    def out_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    def window_of(self, layer: int) -> Optional[int]:
        return self.sliding_window if self.layers[layer].attention == AttentionType.SLIDING_WINDOW else None

    def num_parameters(self) -> int:
        h, d, i = self.hidden_size, self.dim_per_head, self.intermediate_size
        q, kv = self.num_heads * d, self.kv_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.out_bias:
            attn += h
        mlp = (3 if self.ffn == FFNType.GATED else 2) * h * i
        if self.mlp_bias:
            mlp += (2 * i if self.ffn == FFNType.GATED else i) + h
        norm = h if self.norm == NormType.RMS else 2 * h
        per_layer = attn + mlp + 2 * norm
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + norm + head
