"""Phi-3 and Phi-3.5 mini (`Phi3ForCausalLM`): Llama's blocks, but the checkpoint stores Q/K/V as one `qkv_proj` and
the MLP's gate and up projections as one `gate_up_proj` (gate first); the layout rules below make those tensors the
program's parameters, split at load time. Long-context variants use LongRoPE ("su"/"longrope" scaling): short
factors while the sequence is within `original_max_position_embeddings`, long ones beyond.

Config rules of transformers 5's Phi3Config: a top-level `original_max_position_embeddings` (default 4096) wins over
the one inside the rope settings, the legacy rope types "su" and "yarn" both mean longrope, and a `sliding_window`
(when not null) bounds attention on every layer. Phi-3's generation recomputes its cache when the sequence first
outgrows the original context (`longrope_cache_restart`).
"""

from __future__ import annotations

from typing import Any

from ...ir.attrs import RopeKind
from ...ir.layout import LayoutRule, SplitParam
from ..spec import ModelSpec, RopeSpec
from . import phi
from .base import HEAD_NAMES, Family, NameTable

# transformers' Phi3Config defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,  # None: as many as attention heads
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "sliding_window": None,
    "rope_theta": 10000.0,
}

NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        ("model.layers.{i}.self_attn.qkv_proj.weight", "layers.{i}.attn.qkv_proj.weight"),
        ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
        ("model.layers.{i}.mlp.gate_up_proj.weight", "layers.{i}.mlp.gate_up_proj.weight"),
        ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
        ("model.norm.weight", "norm.weight"),
    ) + HEAD_NAMES,
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",  # recomputed from the config
)


def layout(spec: ModelSpec) -> tuple[LayoutRule, ...]:
    """The fused checkpoint tensors, in the order transformers slices them (q, k, v; gate, up)."""
    return (
        SplitParam("qkv_proj.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
        SplitParam("gate_up_proj.weight", ("gate_proj.weight", "up_proj.weight")),
    )


_LONGROPE_ALIASES = ("su", "yarn", "longrope")  # Phi3Config renames the first two


def config(c) -> dict[str, Any]:
    """The spec fields Phi3Config reads from a config.json (its rope rules in the module docstring)."""
    data = dict(c.data)
    key = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    params = data.get(key)
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type"))
        if kind in _LONGROPE_ALIASES:
            params = {k: v for k, v in params.items() if k != "type"}
            params.update(rope_type="longrope", original_max_position_embeddings=c.get(
                "original_max_position_embeddings"))
            data[key] = params
        elif kind not in (None, "default"):  # Phi3Config's own check
            raise c.error(f"unsupported rope type {kind!r} in `{key}`; Phi-3 supports default and longrope")
    fields = type(c)(data, c.family, c.where).common()
    partial = phi.partial_rotary(c, 1.0)
    rope: RopeSpec = fields["rope"]
    if rope.kind == RopeKind.LONGROPE:  # transformers only warns, then fails inside torch
        head_dim = fields["head_dim"] or fields["hidden_size"] // fields["num_heads"]
        wanted = int(head_dim * partial) // 2
        for name in ("short_factor", "long_factor"):
            got = len(getattr(rope, name))
            if got != wanted:
                raise c.error(f"`{key}.{name}` has {got} entries; the rotary embedding has {wanted} frequencies "
                              f"(head_dim {head_dim} x partial_rotary_factor {partial} / 2)")
    return {**fields, "partial_rotary_factor": partial, "sliding_window": c.get("sliding_window"),
            "longrope_cache_restart": True}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """Phi3ForCausalLM's config.json for a spec (the inverse of `config`)."""
    from ..hf import HF_ACTIVATION, rope_parameters

    rope = {**rope_parameters(spec), "partial_rotary_factor": spec.partial_rotary_factor}
    eos = list(spec.eos_token_ids)
    out: dict[str, Any] = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": HF_ACTIVATION[spec.activation],
        "max_position_embeddings": spec.max_position_embeddings,
        # read before the rope settings' own value (Phi3Config), so it must say the same
        "original_max_position_embeddings": (spec.rope.original_max_position_embeddings
                                             if spec.rope.kind == RopeKind.LONGROPE else
                                             spec.max_position_embeddings),
        "rms_norm_eps": spec.norm_eps,
        "partial_rotary_factor": spec.partial_rotary_factor,
        "sliding_window": spec.sliding_window,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
        "rope_parameters": rope,
        "rope_theta": spec.rope.theta,
        "rope_scaling": None if spec.rope.kind == RopeKind.DEFAULT else {k: v for k, v in rope.items()
                                                                         if k != "rope_theta"},
    }
    if spec.head_dim is not None and spec.head_dim != spec.hidden_size // spec.num_heads:
        out["head_dim"] = spec.head_dim
    return out


PRESETS = (
    # microsoft/Phi-3-mini-4k-instruct
    ModelSpec(name="phi3-mini", family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
              num_layers=32, num_heads=32, num_kv_heads=32, max_position_embeddings=4096, norm_eps=1e-5,
              rope=RopeSpec(theta=10000.0), sliding_window=2047, bos_token_id=1, eos_token_ids=(32000,),
              pad_token_id=32000, longrope_cache_restart=True),
)

FAMILIES = (
    Family(
        "phi3",
        architectures=("Phi3",),
        config=config,
        model_types=("phi3",),
        defaults=DEFAULTS,
        names=NAMES,
        layout=layout,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.qkv_proj\.weight",
            r"(model\.)?layers\.\d+\.mlp\.gate_up_proj\.weight",
        ),
        presets=PRESETS,
        hub_ids=((r"microsoft/Phi-3-mini-4k-instruct", "phi3-mini"),),
        to_hf_config=to_hf_config,
    ),
)
