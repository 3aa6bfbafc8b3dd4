"""Jamba (ai21labs, transformers' JambaForCausalLM): a hybrid of attention and Mamba layers, each followed by an FFN
that is a mixture of experts on some layers and a SwiGLU MLP on the others.

Layer i mixes with attention when i % attn_layer_period == attn_layer_offset, else with a Mamba mixer; its FFN is
the mixture when i % expert_layer_period == expert_layer_offset (and num_experts > 1). Attention has no position
encoding (the Mamba layers carry order). Jamba's Mamba mixer RMS-normalizes dt, B and C after x_proj, with weights
and the model's eps (`MambaSpec.bcdt_norm`). The router is a float32 softmax over all experts, then the top
`num_experts_per_tok`, not renormalized, cast to the compute dtype before scaling the expert outputs.
"""

from __future__ import annotations

from typing import Any

from ...ir.errors import MlxcError
from ..spec import (AttentionType, BlockKind, FFNType, LayerSpec, MambaSpec, ModelSpec, MoESpec, PositionEmbedding)
from . import _moe, llama, mamba
from .base import HEAD_NAMES, Family, NameTable

# transformers' JambaConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536,
    "tie_word_embeddings": False,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 262144,
    "num_experts_per_tok": 2,
    "num_experts": 16,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "attn_layer_period": 8,
    "attn_layer_offset": 4,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": "auto",
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
}

NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.weight", "layers.{i}.attn.{qkvo}_proj.weight"),
        ("model.layers.{i}.mamba.{part}", "layers.{i}.mixer.{part}"),
        ("model.layers.{i}.pre_ff_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.feed_forward.{mlp}_proj.weight", "layers.{i}.mlp.{mlp}_proj.weight"),  # dense layers
        ("model.layers.{i}.feed_forward.router.weight", "layers.{i}.mlp.router.weight"),
        ("model.layers.{i}.feed_forward.experts.{e}.{mlp}_proj.weight",
         "layers.{i}.mlp.experts.{e}.{mlp}_proj.weight"),
        ("model.final_layernorm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={**_moe.FIELDS, "part": mamba.MIXER + r"|(?:dt|b|c)_layernorm\.weight"},
)

_MAMBA_KEYS = {"state_size": "mamba_d_state", "conv_kernel": "mamba_d_conv", "expand": "mamba_expand",
               "time_step_rank": "mamba_dt_rank"}


def _every(c, period_key: str, offset_key: str, count: int) -> list[bool]:
    """Which of `count` layers have i % period == offset, the two read from the config and checked as
    JambaConfig checks them."""
    period, offset = c.get(period_key), c.get(offset_key)
    for key, value in ((period_key, period), (offset_key, offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == period_key else 0):
            raise c.error(f"`{key}` must be a {'positive' if key == period_key else 'non-negative'} integer, "
                          f"got {value!r}")
    if offset >= period:
        raise c.error(f"{offset_key} ({offset}) must be smaller than {period_key} ({period})")
    return [i % period == offset for i in range(count)]


def config(c) -> dict[str, Any]:
    fields = llama.config(c)  # Llama's keys (heads, eps, vocabulary, ...)
    count = c.need("num_hidden_layers")
    attention = _every(c, "attn_layer_period", "attn_layer_offset", count)
    experts = _moe.num_experts(c, "num_experts", "num_local_experts")
    sparse = [s and experts > 1 for s in _every(c, "expert_layer_period", "expert_layer_offset", count)]
    moe = None
    if any(sparse):
        moe = _moe.moe_settings(c, experts, "num_experts", "intermediate_size", normalize=False)
    for key in ("mamba_conv_bias", "mamba_proj_bias"):
        if not isinstance(c.get(key), bool):
            raise c.error(f"`{key}` must be true or false, got {c.get(key)!r}")
    mixer = mamba.mixer_settings(c, _MAMBA_KEYS, bcdt_norm=True, use_bias=c.get("mamba_proj_bias"),
                                 use_conv_bias=c.get("mamba_conv_bias"))
    layers = tuple(LayerSpec(block=BlockKind.ATTENTION if a else BlockKind.MAMBA,
                             ffn=FFNType.MOE if s else FFNType.GATED) for a, s in zip(attention, sparse))
    return {**fields, "attention_bias": False, "mlp_bias": False, "position": PositionEmbedding.NONE,
            "ffn": FFNType.GATED, "moe": moe, "mamba": mixer if not all(attention) else None, "layers": layers}


def _period(picked: list[bool]) -> tuple[int, int]:
    """(period, offset) with picked[i] == (i % period == offset) when one exists (else the first guess, which the
    exporter's program comparison then refuses)."""
    count, hits = len(picked), [i for i, p in enumerate(picked) if p]
    if not hits:
        return count + 1, count  # never: offset count is past every layer
    if len(hits) == 1:
        return max(count, hits[0] + 1), hits[0]
    period = hits[1] - hits[0]
    return period, hits[0] % period


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """JambaForCausalLM's config.json for a spec; what it cannot hold (a layer pattern no period describes,
    renormalized routing, biases, ...) is found by `hf_config_from_spec` comparing the programs."""
    if spec.num_heads is None:
        raise MlxcError(f"model {spec.name!r} has no Hugging Face (JambaForCausalLM) equivalent: Jamba's attention "
                        "settings (num_heads) are missing")
    out = llama.to_hf_config(spec.model_copy(update={"attention_bias": False, "mlp_bias": False,
                                                     "sliding_window": None, "layers": ()}))
    for key in ("attention_bias", "mlp_bias", "head_dim", "rope_parameters", "rope_theta", "rope_scaling"):
        out.pop(key, None)
    attn_period, attn_offset = _period([layer.block == BlockKind.ATTENTION for layer in spec.layers])
    sparse = [spec.layer(i).ffn is not None and spec.layer(i).ffn.kind == FFNType.MOE for i in range(spec.num_layers)]
    expert_period, expert_offset = _period(sparse)
    m = spec.moe or MoESpec(num_experts=1, top_k=1, intermediate_size=spec.intermediate_size)
    mixer = mamba.mixer_fields(spec)
    out.update(
        architectures=["JambaForCausalLM"], model_type="jamba",
        intermediate_size=m.intermediate_size if spec.moe is not None else spec.intermediate_size,
        num_experts=m.num_experts if any(sparse) else 1, num_experts_per_tok=m.top_k,
        attn_layer_period=attn_period, attn_layer_offset=attn_offset,
        expert_layer_period=expert_period, expert_layer_offset=expert_offset,
        mamba_d_state=mixer["state_size"], mamba_d_conv=mixer["conv_kernel"], mamba_expand=mixer["expand"],
        mamba_dt_rank=mixer["time_step_rank"], mamba_conv_bias=mixer["use_conv_bias"],
        mamba_proj_bias=mixer["use_bias"],
    )
    if spec.head_dim is not None and spec.head_dim != spec.hidden_size // spec.num_heads:
        out["head_dim"] = spec.head_dim  # not a config field, but the modeling code reads it
    return out


def _layers(count: int, attn: tuple[int, int], expert: tuple[int, int]) -> tuple[LayerSpec, ...]:
    return tuple(LayerSpec(block=BlockKind.ATTENTION if i % attn[0] == attn[1] else BlockKind.MAMBA,
                           attention=AttentionType.FULL,
                           ffn=FFNType.MOE if i % expert[0] == expert[1] else FFNType.GATED) for i in range(count))


def preset(name: str, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, experts: int,
           vocab: int = 65536, max_positions: int = 262144, attn=(8, 4), expert=(2, 1)) -> ModelSpec:
    """Jamba's layout (attention every 8th layer from 4, experts every 2nd from 1, top-2 unnormalized routing, a
    Mamba mixer with state 16, conv 4, expand 2) at the given sizes; bos 1, eos 2, pad 0."""
    return ModelSpec(
        name=name, family="jamba", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=max_positions,
        norm_eps=1e-6, position=PositionEmbedding.NONE, layers=_layers(layers, attn, expert),
        moe=MoESpec(num_experts=experts, top_k=2, intermediate_size=intermediate),
        mamba=MambaSpec(time_step_rank=-(-hidden // 16), bcdt_norm=True),
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


PRESETS = (
    # ai21labs/Jamba-v0.1
    preset("jamba-v0.1", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, experts=16),
    # a small Jamba with its layout (one attention layer, four mixtures in eight layers), to compile and run anywhere
    preset("jamba-tiny", hidden=256, intermediate=512, layers=8, heads=8, kv_heads=2, experts=4, vocab=32000,
           max_positions=4096),
)

FAMILIES = (
    Family(
        "jamba",
        architectures=("Jamba",),
        config=config,
        model_types=("jamba",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=_moe.layout,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.mamba\.x_proj\.weight",
            r"(model\.)?layers\.\d+\.mamba\.dt_layernorm\.weight",
            r"(model\.)?layers\.\d+\.pre_ff_layernorm\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"ai21labs/Jamba-v0\.1", "jamba-v0.1"),),
        to_hf_config=to_hf_config,
    ),
)
