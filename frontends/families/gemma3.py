"""Gemma 3 text models (Gemma3ForCausalLM, model type `gemma3_text`: google/gemma-3-270m, 1b, and the language
models of 4b, 12b, 27b; FunctionGemma 270M): Gemma 2's sandwich blocks, without soft-caps by default, plus
- an RMSNorm with (1 + w) over each head's queries and keys before rope,
- five sliding-window layers to one global layer (`layer_types`, else `sliding_window_pattern`, default 6),
- separate rotary embeddings per layer type: `rope_parameters` holds one for `sliding_attention` (base 10000) and one
  for `full_attention` (base 1e6, with the model's rope scaling: linear x8 from 4B up).

The rope parameters are read as transformers 5's Gemma3TextConfig reads them: the nested `rope_parameters`, with a
transformers-4 `rope_scaling` merged into the global layers' entry, `rope_theta` as the global base and
`rope_local_base_freq` as the local one where the entries give none.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...ir.attrs import RopeKind
from ..gguf import COMMON_TENSORS, GGUFArch, GGUFMetadata, tensor_rules
from ..spec import AttentionType, LayerSpec, ModelSpec, Residual, RopeSpec
from . import gemma, gemma2
from .base import Family, NameTable

# transformers' Gemma3TextConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    **gemma2.DEFAULTS,
    "max_position_embeddings": 131072,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "rope_theta": 1_000_000.0,  # the global layers' base (`default_theta["global"]`)
    "rope_local_base_freq": 10_000.0,  # the sliding layers' (`default_theta["local"]`)
    "sliding_window_pattern": 6,  # only read when `layer_types` is absent
}

NAMES = NameTable(
    gemma.SANDWICH_NAMES.rows + (("model.layers.{i}.self_attn.{qk}_norm.weight", "layers.{i}.attn.{qk}_norm.weight"),),
    fields={"qk": "[qk]"},
    ignored=gemma.IGNORED,
)

TYPES = ("sliding_attention", "full_attention")


def ropes(c) -> dict[str, RopeSpec]:
    """The rope of each layer type, as Gemma3TextConfig.convert_rope_params_to_dict resolves it."""
    from ..hf import read_rope

    params = c.data.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise c.error(f"`rope_parameters` must be an object, got {params!r}")
    flat = sorted(set(params) - set(TYPES))
    if flat:  # transformers reads only the per-type entries and would silently drop these
        raise c.error(f"`rope_parameters` is read per layer type ({', '.join(TYPES)}); its top-level keys {flat} "
                      "would be ignored (transformers ignores them too): move them under `full_attention`")
    per = {t: dict(params.get(t) or {"rope_type": "default"}) for t in TYPES}
    scaling = c.data.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            raise c.error(f"`rope_scaling` must be an object, got {scaling!r}")
        per["full_attention"].update(scaling)  # transformers 4 configs: scaling belongs to the global layers
    per["full_attention"].setdefault("rope_theta", c.get("rope_theta"))
    per["sliding_attention"].setdefault("rope_theta", c.get("rope_local_base_freq"))
    max_pos = c.get("max_position_embeddings")
    max_pos = max_pos if isinstance(max_pos, int) else 1
    return {t: read_rope({"rope_parameters": p}, max_pos, 10000.0, f"{c.where}: rope_parameters.{t}")
            for t, p in per.items()}


def pattern_kinds(c) -> list[AttentionType]:
    """`layer_types`, else every `sliding_window_pattern`-th layer global (transformers' backward-compatible key)."""
    pattern = c.get("sliding_window_pattern")
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise c.error(f"`sliding_window_pattern` must be a positive integer, got {pattern!r}")
    return gemma2.layer_kinds(
        c, lambda i: AttentionType.SLIDING_WINDOW if (i + 1) % pattern else AttentionType.FULL)


def config(c) -> dict[str, Any]:
    if "text_config" in c.data:
        raise c.error("this is a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); mlxc reads Gemma 3 "
                      "text models (Gemma3ForCausalLM, model_type gemma3_text)")
    sandwich = gemma2.sandwich_fields(c)
    kinds = pattern_kinds(c) if c.get("layer_types") is None else gemma2.layer_kinds(c, None)
    rope = ropes(c)
    fields = gemma2.common(c, hidden_act=c.get("hidden_activation"), rope_parameters=None, rope_scaling=None)
    layers = tuple(LayerSpec(attention=k, rope=rope["sliding_attention"] if k == AttentionType.SLIDING_WINDOW else None)
                   for k in kinds)
    return {**fields, **sandwich, "embedding_multiplier": fields["hidden_size"] ** 0.5, "qk_norm": True,
            "rope": rope["full_attention"], "sliding_window": gemma2.window(c, kinds), "layers": layers}


# ------------------------------------------------------------------------------------------------ config writer


def _rope_of(spec: ModelSpec, kind: AttentionType, default: RopeSpec) -> RopeSpec:
    """The rope of the first layer of `kind` (every such layer must agree for the config to describe the spec)."""
    return next((layer.rope or spec.rope for layer in spec.layers if layer.attention == kind), default)


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    from ..hf import rope_parameters

    full = _rope_of(spec, AttentionType.FULL, spec.rope)
    local = _rope_of(spec, AttentionType.SLIDING_WINDOW, RopeSpec(theta=DEFAULTS["rope_local_base_freq"]))
    compat = gemma.rope_keys(spec, full)  # transformers 4 reads the global rope from these, the local base below
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **gemma2.sandwich_hf_fields(spec),
            "rope_parameters": {"sliding_attention": rope_parameters(spec, local),
                                "full_attention": rope_parameters(spec, full)},
            "rope_theta": compat["rope_theta"], "rope_scaling": compat["rope_scaling"],
            "rope_local_base_freq": local.theta}


# ------------------------------------------------------------------------------------------------------ GGUF

NORMS = gemma2.NORMS + ("q_norm", "k_norm")

QK_NORM_TENSORS = (
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"layers.\1.attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"layers.\1.attn.k_norm.weight"),
)


def gguf_fields(md: GGUFMetadata, common: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's gemma3 graph: with a stored window, five sliding layers to one global; the sliding layers rotate
    with base 10000 (`rope.freq_base_swa` when stored) and no scaling, the global ones with the file's rope; no
    attention soft-cap; a final soft-cap only when stored."""
    n = common["num_layers"]
    size = md.get("attention.sliding_window")
    kinds = gemma2.swa_kinds(n, 6) if size else [AttentionType.FULL] * n
    local = RopeSpec(theta=md.get("rope.freq_base_swa", 10000.0))
    fields = {**gemma.gemma_fields(common["hidden_size"]), "residual": Residual.SANDWICH, "qk_norm": True,
              "sliding_window": size or None,
              "layers": tuple(LayerSpec(attention=k, rope=local if k == AttentionType.SLIDING_WINDOW else None)
                              for k in kinds),
              "query_scale": gemma2.llama_cpp_query_scale(md, common, big_layers=62)}
    if md.get("final_logit_softcapping"):
        fields["final_logit_softcap"] = md.get("final_logit_softcapping")
    return fields


# ------------------------------------------------------------------------------------------------------ presets


def preset(name: str, **fields: Any) -> ModelSpec:
    """Gemma 3's published text settings: the 262k vocabulary, head_dim 256, sandwich blocks with q/k norms, five
    sliding layers to one global, rope base 10000 on sliding layers and 1e6 (plus the model's scaling) on global
    ones, no soft-caps. The 4B, 12B and 27B language models have a 262208-token table, a 1024-token window, a 128k
    context and linear rope scaling x8."""
    n = fields["num_layers"]
    local = RopeSpec(theta=10000.0)
    kinds = [AttentionType.SLIDING_WINDOW if (i + 1) % 6 else AttentionType.FULL for i in range(n)]
    base: dict[str, Any] = dict(
        family="gemma3", vocab_size=262144, head_dim=256, residual=Residual.SANDWICH, qk_norm=True,
        max_position_embeddings=32768, sliding_window=512, rope=RopeSpec(theta=1_000_000.0),
        layers=tuple(LayerSpec(attention=k, rope=local if k == AttentionType.SLIDING_WINDOW else None)
                     for k in kinds))
    return gemma.preset(name, **{**base, **fields})


def _large(name: str, **fields: Any) -> ModelSpec:
    return preset(name, vocab_size=262208, sliding_window=1024, max_position_embeddings=131072,
                  rope=RopeSpec(theta=1_000_000.0, kind=RopeKind.LINEAR, factor=8.0), **fields)


PRESETS = (
    # google/gemma-3-270m
    preset("gemma3-270m", hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4, num_kv_heads=1,
           query_scale=256**-0.5),
    # google/functiongemma-270m-it: Gemma 3 270M's architecture, tuned for function calling
    preset("functiongemma-270m", hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4, num_kv_heads=1,
           query_scale=256**-0.5),
    # google/gemma-3-1b-pt
    preset("gemma3-1b", hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1,
           query_scale=256**-0.5),
    # the language models of google/gemma-3-{4b,12b,27b}-pt (their text_config)
    _large("gemma3-4b", hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4,
           query_scale=256**-0.5),
    _large("gemma3-12b", hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16, num_kv_heads=8,
           query_scale=256**-0.5),
    # 27B: head_dim 128 and queries scaled by (hidden / heads) = 168 ** -0.5
    _large("gemma3-27b", hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32, num_kv_heads=16,
           head_dim=128, query_scale=168**-0.5),
)

FAMILIES = (
    Family(
        "gemma3",
        architectures=("Gemma3", "Gemma3Text"),
        config=config,
        # `gemma3` is the multimodal wrapper's type: detected so that `config` can say what mlxc reads instead
        model_types=("gemma3_text", "gemma3"),
        defaults=DEFAULTS,
        names=NAMES,
        tensor_markers=gemma2.FAMILIES[0].tensor_markers + (r"(model\.)?layers\.\d+\.self_attn\.q_norm\.weight",),
        gguf=GGUFArch("gemma3", "gemma3", tensor_rules(*COMMON_TENSORS, *gemma2.SANDWICH_TENSORS, *QK_NORM_TENSORS),
                      spec_fields=gguf_fields, layout=gemma.norm_layout(NORMS)),
        presets=PRESETS,
        hub_ids=(
            (r"google/gemma-3-(270m|1b|4b|12b|27b)(-it|-pt)?", r"gemma3-\1"),
            (r"google/functiongemma-270m(-it)?", "functiongemma-270m"),
        ),
        to_hf_config=to_hf_config,
    ),
)
