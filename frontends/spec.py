"""ModelSpec: the architecture of a model, validated and frozen, independent of where it came from.

Every frontend (presets, YAML/JSON specs, Hugging Face configs, GGUF metadata) produces one; `lower.py` turns it into IR.

The model-level fields describe every layer; a `LayerSpec` overrides some of them for one layer (sliding vs global
attention, a layer-specific rope, a dense FFN in a mixture-of-experts model). `ModelSpec.layer(i)` resolves both
into one frozen `LayerConfig`, which is all lowering reads, and layers with equal configurations share one IR
function.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Literal, Optional

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..ir.attrs import RopeKind, RopeScaling


class _Kinds(type):
    """Iterating a kind class lists every registered kind, built-in ones first."""

    def __iter__(cls):
        return iter(tuple(cls._known.values()))


class _Kind(str, metaclass=_Kinds):
    """A registered name, not a closed enum, so a plugin adds a kind without editing mlxc; `Kind("name")` accepts
    registered names only, and built-in kinds are class attributes (`BlockKind.MAMBA`). Each subclass keeps its
    own registry; a kind a plugin adds comes with the pydantic model of its settings (`ModelSpec.extensions`)."""

    _what = "kind"
    _known: dict = {}
    _settings: dict = {}  # plugin kind -> the pydantic model of its settings

    def __new__(cls, value):
        if isinstance(value, cls):
            return value
        kind = cls._known.get(value) if isinstance(value, str) else None
        if kind is None:
            raise ValueError(f"unknown {cls._what} {value!r}; expected one of {', '.join(cls._known)}")
        return kind

    @classmethod
    def _make(cls, name: str):
        kind = str.__new__(cls, name)
        cls._known[name] = kind
        setattr(cls, name.upper(), kind)
        return kind

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def builtin(self) -> bool:
        return self.value not in type(self)._settings

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"

    def __reduce__(self):
        return type(self), (self.value,)

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls, serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="json"))


class BlockKind(_Kind):
    """What mixes information across positions in one layer (its FFN, if any, follows). Hybrids list different kinds
    per layer; each kind's builder lives in frontends/blocks/, and each built-in non-attention kind's settings in a
    ModelSpec field (`MIXER_FIELDS`). A plugin adds a kind with `frontends.blocks.mixer(..., settings=)`."""

    _what = "block kind"
    _known: dict = {}
    _settings: dict = {}


class FFNType(_Kind):
    """What a layer's feed-forward sublayer computes. A plugin adds a kind with `frontends.blocks.ffn(...)`."""

    _what = "FFN kind"
    _known: dict = {}
    _settings: dict = {}


for _name in ("attention", "mamba", "mamba2", "lstm", "gru", "mingru"):
    BlockKind._make(_name)
# mamba: Mamba v1 (selective state space); mamba2: multi-head SSD; mingru: "Were RNNs All We Needed?"
for _name in ("gated", "dense", "moe", "none"):
    FFNType._make(_name)
# gated: down(act(gate(x)) * up(x)) (SwiGLU, GeGLU); dense: down(act(up(x))); moe: a mixture of gated experts (see
# MoESpec); none: no FFN sublayer, the mixer is the whole layer (Mamba, RNN stacks)
_KIND_CLASSES = (BlockKind, FFNType)


def register_kind(cls: type, name: str, settings: type):
    """Add a block kind (`cls` BlockKind) or an FFN kind (FFNType) from outside mlxc; `settings` is the pydantic
    model of its `ModelSpec.extensions` entry. A name is registered once across both (a plugin shadowing a built-in
    kind or another plugin's is an error), since settings are found by name."""
    if cls not in _KIND_CLASSES:
        raise ValueError(f"{cls!r} is not a kind registry")
    if not (isinstance(name, str) and name.isidentifier() and name.islower()) or name.upper() in vars(cls):
        raise ValueError(f"{cls._what} {name!r} must be a new lower-case identifier")
    if any(name in k._known for k in _KIND_CLASSES):
        raise ValueError(f"kind {name!r} is registered already")
    if not (isinstance(settings, type) and issubclass(settings, BaseModel)):
        raise ValueError(f"the settings of {cls._what} {name!r} must be a pydantic model class, got {settings!r}")
    cls._settings[name] = settings
    return cls._make(name)


def unregister_kind(name: str) -> None:
    """Forget a plugin's block or FFN kind (unloading the plugin); built-in kinds stay."""
    for cls in _KIND_CLASSES:
        if name in cls._settings:
            del cls._settings[name], cls._known[name]
            delattr(cls, name.upper())


def register_block_kind(name: str, settings: type) -> BlockKind:
    return register_kind(BlockKind, name, settings)


unregister_block_kind = unregister_kind


# The ModelSpec field holding each built-in non-attention block kind's settings.
MIXER_FIELDS: dict = {"mamba": "mamba", "mamba2": "mamba2", "lstm": "recurrent", "gru": "recurrent",
                      "mingru": "recurrent"}


class AttentionType(str, enum.Enum):
    FULL = "full"
    SLIDING_WINDOW = "sliding_window"


class Residual(str, enum.Enum):
    """How norms and the residual stream wrap a layer's attention and FFN."""

    PRE_NORM = "pre_norm"  # x += attn(norm(x)); x += ffn(norm(x))                     (Llama, Qwen, Mistral)
    SANDWICH = "sandwich"  # x += norm(attn(norm(x))); x += norm(ffn(norm(x)))          (Gemma 2, Gemma 3)
    PARALLEL = "parallel"  # x += attn(norm(x)) + ffn(norm(x)), one norm for both        (Phi-2, GPT-J)


class HeadKind(str, enum.Enum):
    """What the model computes from the final hidden states."""

    CAUSAL_LM = "causal_lm"  # next-token logits [B, T, vocab]
    SEQUENCE_CLASSIFICATION = "sequence_classification"  # one row per sequence [B, num_labels], pooled
    TOKEN_CLASSIFICATION = "token_classification"  # a row per token [B, T, num_labels]


class ProblemType(str, enum.Enum):
    """transformers' `problem_type`: which loss the labels mean."""

    REGRESSION = "regression"  # mean squared error
    SINGLE_LABEL = "single_label_classification"  # cross-entropy over num_labels classes
    MULTI_LABEL = "multi_label_classification"  # binary cross-entropy per label


class Pooling(str, enum.Enum):
    LAST = "last"  # the last non-padding token (transformers' *ForSequenceClassification)
    FIRST = "first"
    MEAN = "mean"


class NormType(str, enum.Enum):
    RMS = "rms"
    LAYER = "layer"


class Activation(str, enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU = "relu"


class PositionEmbedding(str, enum.Enum):
    """Where a model learns token order. The first three act in attention (and a layer may choose its own: NoPE
    layers in a rotary model); learned and sinusoidal positions are added to the token embeddings."""

    ROPE = "rope"  # rotary queries and keys (`rope`)
    ALIBI = "alibi"  # a per-head linear penalty by distance on the attention scores (`alibi`: BLOOM, MPT)
    NONE = "none"  # no positions (NoPE; attention-free stacks)
    LEARNED = "learned"  # a trained table [max_position_embeddings, hidden] added to the embeddings (GPT-2)
    SINUSOIDAL = "sinusoidal"  # the fixed sin/cos table of "Attention Is All You Need", added to the embeddings


_LAYER_POSITIONS = (PositionEmbedding.ROPE, PositionEmbedding.ALIBI, PositionEmbedding.NONE)


# far beyond any real model (the largest have ~130 layers); a larger count is a malformed config, refused before
# building: lowering and compiling take seconds per thousand layers, and more than linearly
_MAX_LAYERS = 1024
Count = Annotated[int, Field(strict=True, gt=0)]  # "3" or 3.0 in a config is a mistake to report, not to coerce
TokenId = Annotated[int, Field(strict=True, ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class RopeSpec(_Frozen):
    theta: float = Field(10000.0, gt=0)
    # longrope (Phi-3): per-frequency divisors, the short ones within the original context, the long ones beyond
    short_factor: Optional[tuple[float, ...]] = None
    long_factor: Optional[tuple[float, ...]] = None
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
            short_factor=self.short_factor,
            long_factor=self.long_factor,
        )


class AlibiSpec(_Frozen):
    """ALiBi's per-head slopes (Press et al., 2022). For n heads, n a power of two, both families' slopes are the
    geometric sequence 2^(-bias_max * h / n), h = 1 .. n. Other head counts differ, each as transformers computes it:
    `bloom` takes the sequence of the power of two below n, then every other slope of the one above (bias_max 8);
    `mpt` takes the sequence of the power of two above n, its odd-numbered slopes first, and keeps the first n."""

    slopes: Literal["bloom", "mpt"] = "bloom"
    bias_max: float = Field(8.0, gt=0)  # MPT's alibi_bias_max

    @model_validator(mode="after")
    def _check(self):
        if self.slopes == "bloom" and self.bias_max != 8.0:
            raise ValueError(f"BLOOM's slopes have bias_max 8 (got {self.bias_max}); MPT's take any (slopes: mpt)")
        return self

    def values(self, num_heads: int) -> tuple[float, ...]:
        """The slopes in float32, as transformers rounds them (`_get_alibi_slopes`, `build_mpt_alibi_tensor`)."""
        f32, n = np.float32, num_heads
        if self.slopes == "bloom":
            below = 2 ** math.floor(math.log2(n))
            slopes = f32(2.0 ** (-8.0 / below)) ** np.arange(1, below + 1, dtype=f32)
            if below != n:
                extra = f32(2.0 ** (-8.0 / (2 * below))) ** np.arange(1, 2 * (n - below), 2, dtype=f32)
                slopes = np.concatenate([slopes, extra])
        else:
            above = 2 ** math.ceil(math.log2(n))
            exponents = np.arange(1, above + 1, dtype=f32) * f32(self.bias_max / above)
            slopes = f32(1.0) / np.power(f32(2.0), exponents)
            if above != n:
                slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n]
        return tuple(float(x) for x in slopes.astype(np.float32))


class MoESpec(_Frozen):
    """A mixture of gated experts: a router picks `top_k` of `num_experts` per token (softmax in float32,
    renormalized over the chosen ones when `normalize`); an optional shared expert runs for every token, scaled by
    a sigmoid gate when `shared_expert_gate`."""

    num_experts: Count
    top_k: Count
    intermediate_size: Count  # of each expert
    normalize: bool = False
    shared_expert_intermediate_size: Optional[Count] = None
    shared_expert_gate: bool = False
    router_bias: bool = False
    # the chosen probabilities scale expert outputs in float32 (Mixtral); otherwise they are cast to the compute
    # dtype first (Qwen-MoE, OLMoE): the two differ in half precision, so each family says which transformers does
    weights_in_float32: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.shared_expert_gate and self.shared_expert_intermediate_size is None:
            raise ValueError("shared_expert_gate needs a shared expert (shared_expert_intermediate_size)")
        return self


class MambaSpec(_Frozen):
    """A Mamba (v1) mixer (frontends/blocks/mamba.py): `in_proj` to x and the gate z; a causal depthwise conv over x
    with `activation`; `x_proj` to dt (`time_step_rank`), B and C (`state_size` each), Jamba normalizing each
    (`bcdt_norm`); `dt_proj`; the selective scan with A = -exp(A_log) and the D skip, gated by silu(z); `out_proj`.
    The inner width is `expand * hidden_size`, as transformers computes it."""

    state_size: Count = 16
    conv_kernel: Count = 4
    expand: Count = 2
    time_step_rank: Optional[Count] = None  # None: ceil(hidden_size / 16), transformers' "auto"
    use_bias: bool = False  # in_proj and out_proj
    use_conv_bias: bool = True
    activation: Activation = Activation.SILU  # after the conv (transformers' hidden_act)
    bcdt_norm: bool = False  # RMSNorms with weights on dt, B and C after x_proj, the model's eps (Jamba)

    def rank(self, hidden_size: int) -> int:
        return self.time_step_rank or -(-hidden_size // 16)


class Mamba2Spec(_Frozen):
    """A Mamba-2 mixer (frontends/blocks/mamba2.py): `in_proj` to the gate, x, B, C and dt; a causal depthwise conv
    with SiLU over x, B and C; the SSD scan over `num_heads` heads of `head_dim` features, a scalar decay per head,
    B and C shared by the heads of each of `n_groups` groups; a gated RMSNorm per group; `out_proj`.
    `num_heads * head_dim` must be `expand * hidden_size`, as transformers requires."""

    num_heads: Count
    head_dim: Count = 64
    state_size: Count = 128
    n_groups: Count = 1
    expand: Count = 2
    conv_kernel: Count = 4
    chunk_size: Count = 256
    use_bias: bool = False  # in_proj and out_proj
    use_conv_bias: bool = True
    # dt is clamped to this range in the chunked scan (transformers' `time_step_limit`); None: no upper bound
    time_step_limit: tuple[Annotated[float, Field(ge=0)], Optional[float]] = (0.0, None)

    @model_validator(mode="after")
    def _check(self):
        if self.num_heads % self.n_groups:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")
        low, high = self.time_step_limit
        if high is not None and high <= low:
            raise ValueError(f"time_step_limit {list(self.time_step_limit)} is empty")
        return self

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim


class HeadSpec(_Frozen):
    """The task head over the final hidden states. Classification heads project to `num_labels` with a linear
    layer (`score`), or an MLP (`classifier_hidden_size` set) when built from a spec."""

    kind: HeadKind = HeadKind.CAUSAL_LM
    num_labels: Optional[Count] = None
    problem_type: Optional[ProblemType] = None  # None: regression for one label, else single-label
    pooling: Pooling = Pooling.LAST
    bias: bool = False
    classifier_hidden_size: Optional[Count] = None
    classifier_activation: Activation = Activation.GELU

    @model_validator(mode="after")
    def _check(self):
        if self.kind != HeadKind.CAUSAL_LM and self.num_labels is None:
            raise ValueError(f"a {self.kind.value} head needs num_labels")
        # a setting the head would not use is a mistake to report (dumped specs hold every field at its default)
        changed = {n for n, f in HeadSpec.model_fields.items() if getattr(self, n) != f.default}
        if self.kind == HeadKind.CAUSAL_LM:
            extra = sorted(changed - {"kind"})
            if extra:
                raise ValueError(f"a causal LM head projects to the vocabulary: {', '.join(extra)} do not apply "
                                 "(lm_head_bias sets its bias)")
        if self.kind == HeadKind.TOKEN_CLASSIFICATION and "pooling" in changed:
            raise ValueError("a token classifier scores every token: pooling does not apply")
        if self.classifier_hidden_size is not None and self.bias:
            raise ValueError("an MLP classifier (classifier_hidden_size) always has biases: bias applies to the "
                             "single linear score layer only")
        if self.classifier_hidden_size is None and "classifier_activation" in changed:
            raise ValueError("classifier_activation needs an MLP classifier (classifier_hidden_size)")
        return self

    @property
    def problem(self) -> Optional[ProblemType]:
        if self.kind == HeadKind.CAUSAL_LM:
            return None
        if self.problem_type is not None:
            return self.problem_type
        return ProblemType.REGRESSION if self.num_labels == 1 else ProblemType.SINGLE_LABEL


class RecurrentSpec(_Frozen):
    """The cell of `lstm`, `gru` and `mingru` layers (frontends/blocks/recurrent.py). It reads the layer's normalized
    input; an output projection maps its state back to the model's hidden size when the two differ."""

    hidden_size: Optional[Count] = None  # the cell's state size; None: the model's hidden size
    bias: bool = True  # torch's default: bias_ih and bias_hh (LSTM, GRU); minGRU's z and h~ projections' biases
    out_proj: Optional[bool] = None  # None: an output projection only when the cell's size differs
    out_bias: bool = False


class LayerSpec(_Frozen):
    """One layer's overrides of the model-level settings; None keeps the model's."""

    block: BlockKind = BlockKind.ATTENTION
    attention: AttentionType = AttentionType.FULL
    rope: Optional[RopeSpec] = None  # e.g. Gemma 3's local rope base on sliding layers
    position: Optional[PositionEmbedding] = None  # this layer's attention positions (rope, alibi, none: NoPE)
    ffn: Optional[FFNType] = None  # e.g. a dense layer in a mixture-of-experts model


@dataclass(frozen=True)
class NormConfig:
    kind: NormType
    eps: float
    unit_offset: bool  # the checkpoint stores w - 1 (Gemma): the norm multiplies by 1 + w
    bias: bool = True  # a layer norm's bias (MPT's have none)


@dataclass(frozen=True)
class AttentionConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias: bool
    out_bias: bool
    window: Optional[int]
    rope: Optional[RopeScaling]  # None: no rotary embedding
    rope_theta: float
    rope_dims: int  # rotated features of each head (partial rotary when < head_dim)
    scale: float  # query scaling before the softmax
    softcap: Optional[float]
    qk_norm: bool
    qk_norm_across_heads: bool = False  # the q/k norm spans the whole projection, before the head split (OLMoE)
    clip_qkv: Optional[float] = None  # q, k, v clamped to [-clip, clip] after the projections (OLMoE)
    alibi: Optional[tuple[float, ...]] = None  # ALiBi's slope per query head (BLOOM, MPT)


@dataclass(frozen=True)
class FFNConfig:
    kind: FFNType
    intermediate_size: int
    activation: Activation
    bias: bool
    moe: Optional[MoESpec]
    settings: Any = None  # a plugin FFN kind's settings (its `ModelSpec.extensions` entry)


@dataclass(frozen=True)
class LayerConfig:
    """Everything lowering needs for one layer; equal configurations share one IR function."""

    block: BlockKind
    residual: Residual
    norm: NormConfig
    attention: Optional[AttentionConfig]  # for attention layers
    ffn: Optional[FFNConfig]  # None: no FFN sublayer
    mixer: Any = None  # a non-attention block's settings (its ModelSpec field, e.g. the MambaSpec)


_PATTERN_KEYS = {"every", "block", "otherwise", "offset"}


def _expand_pattern(data):
    """`layer_pattern`, a shorthand for `layers` in hybrids, expanded to one LayerSpec per layer. Either a list of
    layer entries repeated until there are `num_layers` (`[mingru, mingru, attention]`), or every N-th layer one kind
    and the others another (`{every: 4, block: attention, otherwise: mingru}`: layers 3, 7, ...; `offset: k` picks
    layers k, k + N, ...). An entry is a block kind (`mamba`) or LayerSpec fields (`{block: gru, ffn: none}`);
    attention entries that do not say are sliding-window when `sliding_window` is set, as without a pattern."""
    if not isinstance(data, dict) or "layer_pattern" not in data:
        return data
    data = dict(data)
    pattern = data.pop("layer_pattern")
    count = data.get("num_layers")
    if data.get("layers"):
        raise ValueError("give either `layers` or `layer_pattern`, not both")
    if not (isinstance(count, int) and not isinstance(count, bool) and 0 < count <= _MAX_LAYERS):
        return data  # field validation reports num_layers
    sliding = bool(data.get("sliding_window"))
    if isinstance(pattern, (list, tuple)):
        if not pattern:
            raise ValueError("layer_pattern is an empty list")
        entries = [_pattern_entry(e, f"layer_pattern[{i}]", sliding) for i, e in enumerate(pattern)]
        layers = [entries[i % len(entries)] for i in range(count)]
    elif isinstance(pattern, dict) and "every" in pattern:
        unknown = sorted(set(pattern) - _PATTERN_KEYS)
        if unknown:
            raise ValueError(f"layer_pattern has no key {unknown[0]!r} (it has: {', '.join(sorted(_PATTERN_KEYS))})")
        every, offset = pattern["every"], pattern.get("offset", None)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"layer_pattern.every must be a positive integer, got {every!r}")
        offset = every - 1 if offset is None else offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < every:
            raise ValueError(f"layer_pattern.offset must be an integer in 0..{every - 1}, got {offset!r}")
        if "otherwise" not in pattern:
            raise ValueError("layer_pattern with `every` needs `otherwise`: the kind of the other layers")
        block = _pattern_entry(pattern.get("block", "attention"), "layer_pattern.block", sliding)
        other = _pattern_entry(pattern["otherwise"], "layer_pattern.otherwise", sliding)
        layers = [block if i % every == offset else other for i in range(count)]
    else:
        raise ValueError(f"layer_pattern must be a list of layer entries or a mapping with `every`, got {pattern!r}")
    data["layers"] = tuple(layers)
    return data


def _pattern_entry(entry, where: str, sliding: bool) -> "LayerSpec":
    if isinstance(entry, LayerSpec):
        return entry
    if isinstance(entry, str):
        entry = {"block": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a block kind or a mapping of layer fields, got {entry!r}")
    block = entry.get("block", BlockKind.ATTENTION.value)
    kinds = [k.value for k in BlockKind]
    if not isinstance(block, BlockKind) and block not in kinds:
        raise ValueError(f"{where}: unknown block kind {block!r}; expected one of {', '.join(kinds)}")
    if BlockKind(block) == BlockKind.ATTENTION and sliding and "attention" not in entry:
        entry = {**entry, "attention": AttentionType.SLIDING_WINDOW}
    try:
        return LayerSpec.model_validate(entry)
    except ValidationError as err:
        raise ValueError(f"{where}: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors())) from None


def _plugin_settings(data):
    """Settings of plugin block and FFN kinds into `extensions`, each validated by its kind's model: given there, or
    under the kind's name at the top level (`linear_attention: {num_heads: 4}`), as built-in kinds have fields."""
    if not isinstance(data, dict):
        return data
    given = data.get("extensions") or {}
    if not isinstance(given, dict):
        raise ValueError(f"extensions must map plugin kinds to their settings, got {given!r}")
    models = {name: model for cls in _KIND_CLASSES for name, model in cls._settings.items()}
    top = {k: v for k, v in data.items() if isinstance(k, str) and k in models}
    if not given and not top:
        return data
    both = sorted(set(top) & set(given))
    if both:
        raise ValueError(f"the {both[0]} settings are given twice (at the top level and under extensions)")
    out = {}
    for name, value in {**given, **top}.items():
        settings = models.get(name)
        if settings is None:
            known = ", ".join(models) or "none registered; is its plugin installed?"
            raise ValueError(f"extensions: {name!r} is not a kind a plugin added ({known})")
        try:
            out[name] = value if isinstance(value, settings) else settings.model_validate(value)
        except ValidationError as err:
            raise ValueError(f"{name}: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors())) from None
    return {**{k: v for k, v in data.items() if k not in top}, "extensions": out}


class ModelSpec(_Frozen):
    """A decoder-only language model. Sizes are the checkpoint's; derived values are properties."""

    name: str = "model"
    family: str = "llama"
    vocab_size: Count
    hidden_size: Count
    intermediate_size: Count
    num_layers: Annotated[int, Field(strict=True, gt=0, le=_MAX_LAYERS)]
    num_heads: Optional[Count] = None  # attention heads; a model without attention layers has none
    num_kv_heads: Optional[Count] = None
    head_dim: Optional[Count] = None
    max_position_embeddings: Count = 4096
    norm: NormType = NormType.RMS
    norm_eps: float = Field(1e-5, gt=0)
    norm_unit_offset: bool = False  # norms multiply by (1 + w): Gemma's convention
    norm_bias: bool = True  # layer norms add a bias (MPT's do not)
    embedding_norm: bool = False  # the model's norm right after the token embeddings (BLOOM)
    residual: Residual = Residual.PRE_NORM
    # the residual stream stays float32 below float32 (transformers' `residual_in_fp32`: Mamba): each layer reads it
    # cast to the compute dtype and adds its output back in float32; the final norm runs on it in float32
    residual_in_fp32: bool = False
    ffn: FFNType = FFNType.GATED
    activation: Activation = Activation.SILU
    moe: Optional[MoESpec] = None
    recurrent: Optional[RecurrentSpec] = None  # lstm / gru / mingru layers' cell
    position: PositionEmbedding = PositionEmbedding.ROPE
    rope: RopeSpec = RopeSpec()
    alibi: Optional[AlibiSpec] = None  # ALiBi's slopes, for alibi layers; None: BLOOM's
    # generation empties the cache and runs the whole sequence again when it first outgrows LongRoPE's original
    # context, so every key is rotated with the long factors (transformers' Phi-3 generate; other models keep theirs)
    longrope_cache_restart: bool = False
    partial_rotary_factor: float = Field(1.0, gt=0, le=1)  # the share of each head's features that rotate
    attention_bias: bool = False
    attention_out_bias: Optional[bool] = None  # defaults to attention_bias
    query_scale: Optional[float] = Field(None, gt=0)  # default head_dim ** -0.5
    attn_logit_softcap: Optional[float] = Field(None, gt=0)
    qk_norm: bool = False  # the model's norm over head_dim on queries and keys before rope (Qwen3, Gemma 3, Phi)
    qk_norm_across_heads: bool = False  # with qk_norm: one RMSNorm over the whole q (k) projection (OLMoE)
    clip_qkv: Optional[float] = Field(None, gt=0)  # clamp q, k, v to [-clip_qkv, clip_qkv] (OLMoE, OLMo)
    mlp_bias: bool = False
    sliding_window: Optional[Count] = None
    layers: tuple[LayerSpec, ...] = ()
    mamba: Optional[MambaSpec] = None  # mamba layers' mixer
    mamba2: Optional[Mamba2Spec] = None  # mamba2 layers' mixer
    # the settings of block and FFN kinds that plugins add, by kind (`register_kind`); a spec file may also give
    # them under the kind's own name, as `mamba:` gives Mamba's
    extensions: dict[str, Any] = {}
    embedding_multiplier: Optional[float] = None  # embeddings scaled in the compute dtype (Gemma: sqrt(hidden))
    final_logit_softcap: Optional[float] = Field(None, gt=0)
    lm_head_bias: bool = False
    head: HeadSpec = HeadSpec()
    tie_word_embeddings: bool = False
    bos_token_id: Optional[TokenId] = None
    eos_token_ids: tuple[TokenId, ...] = ()
    pad_token_id: Optional[TokenId] = None

    @model_validator(mode="before")
    @classmethod
    def _fill_layers(cls, data):
        """An empty `layers` means every layer is a full-attention block (sliding-window if a window is set);
        a `layer_pattern` says otherwise (see `_expand_pattern`).

        Only a well-formed count is expanded; anything else is left for field validation to report by name."""
        data = _expand_pattern(_plugin_settings(data))
        count = data.get("num_layers") if isinstance(data, dict) else None
        if isinstance(count, int) and not isinstance(count, bool) and 0 < count <= _MAX_LAYERS and not data.get("layers"):
            kind = AttentionType.SLIDING_WINDOW if data.get("sliding_window") else AttentionType.FULL
            data = {**data, "layers": tuple(LayerSpec(attention=kind) for _ in range(data["num_layers"]))}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.has_attention and self.num_heads is None:
            raise ValueError("attention layers need num_heads")
        kinds = {layer.block for layer in self.layers} - {BlockKind.ATTENTION}
        missing = sorted(k.value for k in kinds if self.mixer_settings(k) is None)
        if missing:
            raise ValueError(f"{missing[0]} layers need the `{MIXER_FIELDS.get(missing[0], missing[0])}` settings")
        ffns = {layer.ffn or self.ffn for layer in self.layers}
        missing = sorted(k.value for k in ffns if not k.builtin and k.value not in self.extensions)
        if missing:
            raise ValueError(f"{missing[0]} FFNs need the `{missing[0]}` settings")
        if self.has_attention:
            kv = self.kv_heads
            if self.num_heads % kv:
                raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
            if self.head_dim is None and self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim"
                )
            if PositionEmbedding.ROPE in self._attention_positions() and self.rope_dims % 2:
                raise ValueError(f"rotary embeddings need an even number of rotated features, got {self.rope_dims}")
        self._check_positions()
        if len(self.layers) != self.num_layers:
            raise ValueError(f"layers lists {len(self.layers)} entries but num_layers is {self.num_layers}")
        if any(l.attention == AttentionType.SLIDING_WINDOW for l in self.layers) and not self.sliding_window:
            raise ValueError("a layer uses sliding-window attention but sliding_window is not set")
        uses_moe = self.ffn == FFNType.MOE or any(layer.ffn == FFNType.MOE for layer in self.layers)
        if uses_moe and self.moe is None:
            raise ValueError("an FFN of kind moe needs the moe settings (num_experts, top_k, ...)")
        if self.residual == Residual.PARALLEL and self.norm == NormType.RMS and self.norm_unit_offset:
            raise ValueError("unit-offset norms are a Gemma convention; Gemma blocks are sandwich, not parallel")
        m2 = self.mamba2
        if m2 is not None and m2.intermediate_size != m2.expand * self.hidden_size:
            raise ValueError(f"mamba2: {m2.num_heads} heads of {m2.head_dim} features ({m2.intermediate_size}) must "
                             f"make expand * hidden_size ({m2.expand * self.hidden_size}) features")
        if self.residual_in_fp32 and (self.residual != Residual.PRE_NORM or self.norm != NormType.RMS
                                      or self.norm_unit_offset):
            raise ValueError("residual_in_fp32 is supported for pre-norm RMSNorm blocks (Mamba's) only")
        if self.qk_norm_across_heads and not self.qk_norm:
            raise ValueError("qk_norm_across_heads says how queries and keys are normalized; it needs qk_norm")
        if self.head.kind != HeadKind.CAUSAL_LM and self.tie_word_embeddings:
            raise ValueError("only a causal LM head can be tied to the embeddings")
        return self

    def _attention_positions(self) -> set:
        return {layer.position or self.position for layer in self.layers if layer.block == BlockKind.ATTENTION}

    def _check_positions(self) -> None:
        bad = next((l.position for l in self.layers if l.position not in (None, *_LAYER_POSITIONS)), None)
        if bad is not None:
            raise ValueError(f"a layer's position may be rope, alibi or none, not {bad.value}: learned and "
                             "sinusoidal positions are added to the embeddings, for the whole model")
        if self.alibi is not None and PositionEmbedding.ALIBI not in self._attention_positions():
            raise ValueError("alibi settings are given but no attention layer uses alibi positions")
        if self.position == PositionEmbedding.SINUSOIDAL and self.hidden_size % 2:
            raise ValueError(f"sinusoidal positions need an even hidden_size, got {self.hidden_size}")
        if not self.norm_bias and self.norm != NormType.LAYER:
            raise ValueError("norm_bias: false says a layer norm has no bias; RMS norms never have one")

    @property
    def rope_dims(self) -> int:
        """Rotated features per head: head_dim times partial_rotary_factor, as transformers computes it."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def has_attention(self) -> bool:
        return any(layer.block == BlockKind.ATTENTION for layer in self.layers)

    def layer(self, i: int) -> LayerConfig:
        """Layer i's settings: the model's, with the layer's overrides applied."""
        layer = self.layers[i]
        ffn = layer.ffn or self.ffn
        return LayerConfig(
            block=layer.block,
            residual=self.residual,
            norm=NormConfig(self.norm, self.norm_eps, self.norm_unit_offset, self.norm_bias),
            attention=self._attention(i) if layer.block == BlockKind.ATTENTION else None,
            ffn=None if ffn == FFNType.NONE else FFNConfig(
                kind=ffn,
                intermediate_size=self.intermediate_size,
                activation=self.activation,
                bias=self.mlp_bias,
                moe=self.moe if ffn == FFNType.MOE else None,
                settings=None if ffn.builtin else self.extensions.get(ffn.value),
            ),
            mixer=None if layer.block == BlockKind.ATTENTION else self.mixer_settings(layer.block),
        )

    def mixer_settings(self, kind: BlockKind):
        """A non-attention block kind's settings: its ModelSpec field, or a plugin kind's `extensions` entry."""
        if kind.value in MIXER_FIELDS:
            return getattr(self, MIXER_FIELDS[kind.value], None)
        return self.extensions.get(kind.value)

    def _attention(self, i: int) -> AttentionConfig:
        layer = self.layers[i]
        d = self.dim_per_head
        rope = layer.rope or self.rope
        position = layer.position or self.position
        return AttentionConfig(
                num_heads=self.num_heads,
                num_kv_heads=self.kv_heads,
                head_dim=d,
                bias=self.attention_bias,
                out_bias=self.out_bias,
                window=self.window_of(i),
                rope=rope.scaling(self.max_position_embeddings) if position == PositionEmbedding.ROPE else None,
                rope_theta=rope.theta,
                rope_dims=self.rope_dims,
                scale=self.query_scale if self.query_scale is not None else d**-0.5,
                softcap=self.attn_logit_softcap,
                qk_norm=self.qk_norm,
                qk_norm_across_heads=self.qk_norm_across_heads,
                clip_qkv=self.clip_qkv,
                alibi=(self.alibi or AlibiSpec()).values(self.num_heads) if position == PositionEmbedding.ALIBI
                else None,
            )

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
        """Every checkpoint parameter of the lowered program, counted once (a tied head is the embedding table)."""
        from math import prod

        from .lower import lower

        return sum(prod(p.type.shape) for _, p in lower(self).parameters())
