"""Gemma (google/gemma-2b, gemma-7b): Llama's pre-norm blocks with three Gemma conventions — GeGLU MLPs with the
tanh GELU, RMSNorms that multiply by (1 + w) (checkpoints store w), and embeddings multiplied by sqrt(hidden_size)
in the compute dtype — with the LM head tied to the embeddings.

Gemma 2 and 3 (gemma2.py, gemma3.py) keep these and build on the helpers here.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...ir.attrs import RopeKind
from ...ir.layout import ShiftParam
from ..gguf import COMMON_TENSORS, GGUFArch, GGUFMetadata, tensor_rules
from ..spec import Activation, ModelSpec, RopeSpec
from .base import HEAD_NAMES, Family, NameTable

# transformers' GemmaConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 16,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "rope_theta": 10000.0,
}

IGNORED = r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"  # recomputed from the config

# Gemma 1 keeps Llama's names and roles: `post_attention_layernorm` is the norm before the MLP.
NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.{kind}", "layers.{i}.attn.{qkvo}_proj.{kind}"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.{mlp}_proj.weight", "layers.{i}.mlp.{mlp}_proj.weight"),
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    ignored=IGNORED,
)

# Gemma 2 and 3: four norms per block. The IR's roles (frontends/lower.py) are by position, so Gemma's
# `post_attention_layernorm` (on the attention output) is `attn_out_norm` and its `pre_feedforward_layernorm` (before
# the MLP) is `post_attention_norm`.
SANDWICH_NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.{qkvo}_proj.{kind}", "layers.{i}.attn.{qkvo}_proj.{kind}"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_out_norm.weight"),
        ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.{mlp}_proj.weight", "layers.{i}.mlp.{mlp}_proj.weight"),
        ("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.ffn_out_norm.weight"),
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    ignored=IGNORED,
)


# ------------------------------------------------------------------------------------------------ shared checks


def refuse_unsupported(c) -> None:
    """Settings transformers' Gemma classes have that change the model in ways mlxc does not build."""
    if c.get("use_bidirectional_attention"):
        raise c.error("use_bidirectional_attention=true (an encoder, e.g. EmbeddingGemma) is not supported: mlxc "
                      "builds causal language models")
    partial = c.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):  # Gemma's modeling code rotates whole heads
        raise c.error(f"partial_rotary_factor={partial} is not supported (Gemma rotates all of head_dim)")


def positive(c, key: str) -> float:
    """A config number that must be > 0 (a scale or a cap; 0 would divide by zero in transformers too)."""
    value = c.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise c.error(f"`{key}` must be a positive number, got {value!r}")
    return float(value)


def gemma_fields(hidden_size: int) -> dict[str, Any]:
    """What every Gemma generation shares: (1 + w) norms, the tanh-GELU GeGLU, embeddings times sqrt(hidden)."""
    return dict(norm_unit_offset=True, activation=Activation.GELU_TANH, embedding_multiplier=hidden_size**0.5)


def config(c) -> dict[str, Any]:
    refuse_unsupported(c)
    fields = c.common()
    # transformers 5 reads `hidden_act` and takes the legacy "gelu" of the published configs as the tanh GELU
    act = Activation.GELU_TANH if c.get("hidden_act") == "gelu" else fields["activation"]
    return {**fields, **gemma_fields(fields["hidden_size"]), "activation": act, "partial_rotary_factor": 1.0,
            "attention_bias": bool(c.get("attention_bias"))}


# ------------------------------------------------------------------------------------------------ config writer


def rope_keys(spec: ModelSpec, rope: RopeSpec) -> dict[str, Any]:
    """One rope as transformers 5 (`rope_parameters`) and transformers 4 (`rope_theta`, `rope_scaling`) read it."""
    from ..hf import rope_parameters

    params = rope_parameters(spec, rope)
    scaling = None if rope.kind == RopeKind.DEFAULT else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_parameters": params, "rope_theta": rope.theta, "rope_scaling": scaling}


def hf_fields(spec: ModelSpec) -> dict[str, Any]:
    """The config keys every Gemma generation writes the same way."""
    from ..hf import HF_ACTIVATION

    eos = list(spec.eos_token_ids)
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.dim_per_head,
        "hidden_act": HF_ACTIVATION[spec.activation],
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
        "attention_bias": spec.attention_bias,
    }


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", **hf_fields(spec),
            **rope_keys(spec, spec.rope)}


# ------------------------------------------------------------------------------------------------------ GGUF

NORMS = ("input_norm", "post_attention_norm", "norm")  # Gemma 1's norm parameters, by their name in their function


def norm_layout(norms: Iterable[str]):
    """llama.cpp's converter stores every Gemma norm weight as 1 + w (`modify_tensors` adds 1); the checkpoint-layout
    pass gives the body w back, and fold-shapes cancels that against the norm's own + 1."""

    def rules(spec: ModelSpec) -> tuple[ShiftParam, ...]:
        return tuple(ShiftParam(f"{n}.weight", f"{n}_plus_one.weight", 1.0) for n in norms)

    return rules


def gguf_fields(md: GGUFMetadata, common: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's gemma graph: the embedding scale and (1 + w) norms are implied by the architecture."""
    return gemma_fields(common["hidden_size"])


# ------------------------------------------------------------------------------------------------------ presets


def preset(name: str, **fields: Any) -> ModelSpec:
    """What every published Gemma shares: the 256k sentencepiece vocabulary (bos 2, eos 1, pad 0), (1 + w) norms,
    the tanh-GELU GeGLU, embeddings times sqrt(hidden), a tied head, eps 1e-6, rope base 10000, 8k context."""
    base: dict[str, Any] = dict(family="gemma", vocab_size=256000, max_position_embeddings=8192, norm_eps=1e-6,
                                tie_word_embeddings=True, bos_token_id=2, eos_token_ids=(1,), pad_token_id=0,
                                **gemma_fields(fields["hidden_size"]))
    return ModelSpec(name=name, **{**base, **fields})


PRESETS = (
    # google/gemma-2b: multi-query attention
    preset("gemma-2b", hidden_size=2048, intermediate_size=16384, num_layers=18, num_heads=8, num_kv_heads=1,
           head_dim=256),
    # google/gemma-7b: 16 heads of 256 over a 3072-wide stream
    preset("gemma-7b", hidden_size=3072, intermediate_size=24576, num_layers=28, num_heads=16, num_kv_heads=16,
           head_dim=256),
)

FAMILIES = (
    Family(
        "gemma",
        architectures=("Gemma",),
        config=config,
        model_types=("gemma",),
        defaults=DEFAULTS,
        names=NAMES,
        # no tensor markers: Gemma 1 tensors carry Llama's names, only the config tells them apart
        gguf=GGUFArch("gemma", "gemma", tensor_rules(*COMMON_TENSORS), spec_fields=gguf_fields,
                      layout=norm_layout(NORMS)),
        presets=PRESETS,
        hub_ids=(
            (r"google/gemma-(1\.1-)?(2b|7b)(-it)?", r"gemma-\2"),
        ),
        to_hf_config=to_hf_config,
    ),
)
