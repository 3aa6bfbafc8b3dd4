"""Phi-1, Phi-1.5 and Phi-2 (`PhiForCausalLM`): one LayerNorm (with bias) feeds attention and a dense GELU MLP in
parallel, both added to the residual; biases on every projection and on the LM head; rotary on the first
`partial_rotary_factor` of each head (transformers' PhiConfig defaults it to 0.5); `final_layernorm` before the
head; optionally a LayerNorm over each head's queries and keys (`qk_layernorm`, off in the published models).
"""

from __future__ import annotations

from typing import Any, Mapping

from ...ir.attrs import RopeKind
from ..gguf import GGUFArch, tensor_rules
from ..spec import Activation, FFNType, ModelSpec, NormType, Residual, RopeSpec
from .base import HEAD_NAMES, Family, NameTable

# transformers' PhiConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,  # None: as many as attention heads
    "head_dim": None,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "qk_layernorm": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "rope_theta": 10000.0,
}
PARTIAL_ROTARY = 0.5  # PhiConfig's default share of each head that rotates

# (Hugging Face name, IR name): `dense` is the output projection, `fc1`/`fc2` the MLP's up and down projections
NAMES = NameTable(
    (
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.layers.{i}.input_layernorm.{kind}", "layers.{i}.input_norm.{kind}"),
        ("model.layers.{i}.self_attn.{qkv}_proj.{kind}", "layers.{i}.attn.{qkv}_proj.{kind}"),
        ("model.layers.{i}.self_attn.dense.{kind}", "layers.{i}.attn.o_proj.{kind}"),
        ("model.layers.{i}.self_attn.{qk}_layernorm.{kind}", "layers.{i}.attn.{qk}_norm.{kind}"),
        ("model.layers.{i}.mlp.fc1.{kind}", "layers.{i}.mlp.up_proj.{kind}"),
        ("model.layers.{i}.mlp.fc2.{kind}", "layers.{i}.mlp.down_proj.{kind}"),
        ("model.final_layernorm.{kind}", "norm.{kind}"),
        ("lm_head.bias", "lm_head.bias"),
    ) + HEAD_NAMES,
    fields={"qkv": "[qkv]", "qk": "[qk]"},
    ignored=r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",  # recomputed from the config
)


# llama.cpp's `phi2` tensor names (its converter keeps Q/K rows in Hugging Face's order: Phi's rope is NeoX-style)
GGUF_TENSORS = tensor_rules(
    (r"token_embd\.weight", "embed_tokens.weight"),
    (r"blk\.(\d+)\.attn_norm\.(weight|bias)", r"layers.\1.input_norm.\2"),
    (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"layers.\1.attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"layers.\1.mlp.up_proj.\2"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"layers.\1.mlp.down_proj.\2"),
    (r"output_norm\.(weight|bias)", r"norm.\1"),
    (r"output\.(weight|bias)", r"lm_head.\1"),
    (r"blk\.(\d+)\.attn_rot_embd", None),
)


def gguf_fields(g, common: dict[str, Any]) -> dict[str, Any]:
    """Phi's block from a `phi2` GGUF: what the common keys cannot say. Files that store Q/K/V fused (`attn_qkv`,
    from the original Phi-2 release) are refused by name."""
    if g.has_tensor(r"blk\.\d+\.attn_qkv\.weight"):
        raise g.error("fused attn_qkv tensors (converted from the original Phi-2 format) are not supported; "
                      "convert the Hugging Face checkpoint (separate q/k/v projections) instead")
    return dict(norm=NormType.LAYER, norm_eps=g.get("attention.layer_norm_epsilon", 1e-5),
                residual=Residual.PARALLEL, ffn=FFNType.DENSE, activation=Activation.GELU_TANH,
                attention_bias=True, mlp_bias=True, lm_head_bias=g.has_tensor(r"output\.bias"))


def rope_dict(c) -> Mapping[str, Any]:
    """The rope settings transformers 5 reads: a non-empty `rope_scaling`, else `rope_parameters`."""
    params = c.data.get("rope_scaling") or c.data.get("rope_parameters") or {}
    return params if isinstance(params, Mapping) else {}


def partial_rotary(c, default: float) -> float:
    """transformers 5 keeps `partial_rotary_factor` in the rope settings: there first, then the top-level key, then
    the config class's default."""
    value = rope_dict(c).get("partial_rotary_factor")
    if value is None:
        value = c.data.get("partial_rotary_factor")
    return default if value is None else value


def config(c) -> dict[str, Any]:
    """The spec fields PhiConfig reads from a config.json: Llama's common keys, then Phi's block."""
    fields = c.common()
    qk_norm = bool(c.get("qk_layernorm"))
    if qk_norm and (fields["head_dim"] or 0) not in (0, fields["hidden_size"] // fields["num_heads"]):
        # transformers sizes the q/k LayerNorms by hidden_size // heads whatever head_dim says
        raise c.error(f"qk_layernorm with head_dim {fields['head_dim']} != hidden_size // num_attention_heads")
    return {
        **fields,
        "qk_norm": qk_norm,
        "norm": NormType.LAYER,
        "norm_eps": c.get("layer_norm_eps"),
        "residual": Residual.PARALLEL,
        "ffn": FFNType.DENSE,
        "partial_rotary_factor": partial_rotary(c, PARTIAL_ROTARY),
        "attention_bias": True,
        "mlp_bias": True,
        "lm_head_bias": True,
    }


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """PhiForCausalLM's config.json for a spec (the inverse of `config`)."""
    from ..hf import HF_ACTIVATION, rope_parameters

    rope = {**rope_parameters(spec), "partial_rotary_factor": spec.partial_rotary_factor}
    eos = list(spec.eos_token_ids)
    out: dict[str, Any] = {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "gelu_new" if spec.activation == Activation.GELU_TANH else HF_ACTIVATION[spec.activation],
        "max_position_embeddings": spec.max_position_embeddings,
        "layer_norm_eps": spec.norm_eps,
        "qk_layernorm": spec.qk_norm,
        "partial_rotary_factor": spec.partial_rotary_factor,
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
    # microsoft/phi-2
    ModelSpec(name="phi2", family="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_layers=32,
              num_heads=32, max_position_embeddings=2048, norm=NormType.LAYER, norm_eps=1e-5,
              residual=Residual.PARALLEL, ffn=FFNType.DENSE, activation=Activation.GELU_TANH,
              rope=RopeSpec(theta=10000.0), partial_rotary_factor=0.4, attention_bias=True, mlp_bias=True,
              lm_head_bias=True, bos_token_id=50256, eos_token_ids=(50256,)),
)

FAMILIES = (
    Family(
        "phi",
        architectures=("Phi",),
        config=config,
        model_types=("phi",),
        defaults=DEFAULTS,
        names=NAMES,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.dense\.weight",
            r"(model\.)?layers\.\d+\.mlp\.fc1\.weight",
            r"(model\.)?final_layernorm\.weight",
        ),
        gguf=GGUFArch("phi2", "phi", GGUF_TENSORS, spec_fields=gguf_fields),
        presets=PRESETS,
        hub_ids=((r"microsoft/phi-2", "phi2"),),
        to_hf_config=to_hf_config,
    ),
)
