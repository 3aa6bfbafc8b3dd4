"""Hugging Face checkpoints: `config.json` to ModelSpec, and checkpoint tensor names to mlxc's IR parameter names.

Both transformers-4 configs (top-level `rope_theta`, `rope_scaling`) and transformers-5 configs (`rope_parameters`
holding `rope_theta` and `rope_type`) are read. Keys a config omits take the value transformers' own config class
would give them, so the spec describes the model transformers would build from the same file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Iterable, Mapping, Optional, Union

from pydantic import ValidationError

from ..ir.attrs import RopeKind
from ..ir.errors import MlxcError
from .spec import Activation, ModelSpec, RopeSpec
from .spec_file import validation_message

PathLike = Union[str, Path]

_REQUIRED: Final = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Defaults of transformers' LlamaConfig for keys a config.json may leave out.
_LLAMA_DEFAULTS: Final[Mapping[str, Any]] = {
    "num_key_value_heads": None,  # None: as many as attention heads
    "head_dim": None,  # None: hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "sliding_window": None,
    "rope_theta": 10000.0,
}


@dataclass(frozen=True)
class HFArch:
    """One supported family: how to recognise it and how its modeling code reads the config.

    `biases` / `sliding_window` say whether the modeling code honours those keys (Mistral ignores the bias keys,
    Llama ignores `sliding_window`). `tensor_markers` are regexes that must each match some tensor name; a family
    whose tensors look like an earlier row's leaves them empty.
    """

    family: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    defaults: Mapping[str, Any]
    biases: bool = True
    sliding_window: bool = False
    tensor_markers: tuple[str, ...] = field(default=())


ARCHITECTURES: Final[tuple[HFArch, ...]] = (
    HFArch(
        "llama",
        ("LlamaForCausalLM",),
        ("llama",),
        _LLAMA_DEFAULTS,
        tensor_markers=(
            r"(model\.)?layers\.\d+\.self_attn\.q_proj\.weight",
            r"(model\.)?layers\.\d+\.mlp\.gate_proj\.weight",
            r"(model\.)?layers\.\d+\.input_layernorm\.weight",
        ),
    ),
    HFArch(
        "mistral",
        ("MistralForCausalLM",),
        ("mistral",),
        {
            **_LLAMA_DEFAULTS,
            "num_key_value_heads": 8,
            "max_position_embeddings": 4096 * 32,
            "sliding_window": 4096,
        },
        biases=False,
        sliding_window=True,
    ),
)
_BY_FAMILY: Final = {a.family: a for a in ARCHITECTURES}

_ACTIVATIONS: Final[Mapping[str, Activation]] = {
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "gelu": Activation.GELU,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_new": Activation.GELU_TANH,
    "relu": Activation.RELU,
}

# Spec field -> the Hugging Face key it came from, so validation errors name what the user can see in the file.
_HF_KEY: Final[Mapping[str, str]] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "sliding_window": "sliding_window",
    "rope": "rope_parameters",
    "bos_token_id": "bos_token_id",
    "eos_token_ids": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


def load_hf_config(path: PathLike) -> dict[str, Any]:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise MlxcError(f"cannot read Hugging Face config {p}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MlxcError(f"{p}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise MlxcError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def _supported() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.architectures)})" for a in ARCHITECTURES)


def detect_architecture(config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> str:
    """The family key for a checkpoint: `architectures`, then `model_type`, then tensor-name patterns."""
    declared = config.get("architectures") or []
    if isinstance(declared, str):
        declared = [declared]
    for name in declared:
        for arch in ARCHITECTURES:
            if name in arch.architectures:
                return arch.family
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch.family
    # Tensor names only stand in for missing metadata: a config that declares an unsupported architecture (Gemma,
    # Qwen2, ... share Llama's tensor names but not its math) must not load as Llama.
    if tensor_names is not None and not declared and model_type is None:
        names = list(tensor_names)
        for arch in ARCHITECTURES:
            markers = [re.compile(m) for m in arch.tensor_markers]
            if markers and all(any(m.fullmatch(n) for n in names) for m in markers):
                return arch.family
    seen = f"architectures={list(declared)}, model_type={model_type!r}"
    raise MlxcError(f"unsupported architecture ({seen}); supported: {_supported()}")


def _rope(config: Mapping[str, Any], max_pos: int, theta_default: float, where: str) -> RopeSpec:
    """RopeSpec from either `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).

    Like transformers, a non-empty `rope_scaling` wins, `rope_theta` inside the dict wins over the top-level key,
    and llama3/yarn without `original_max_position_embeddings` measure against `max_position_embeddings`.
    """
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(key) or {}
    if not isinstance(params, Mapping):
        raise MlxcError(f"{where}: `{key}` must be an object, got {params!r}")
    if not {"rope_type", "type", "rope_theta"} & params.keys() and any(isinstance(v, Mapping) for v in params.values()):
        raise MlxcError(f"{where}: per-layer-type `{key}` is not supported for this architecture")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise MlxcError(f"{where}: partial_rotary_factor={partial} is not supported (rotary must cover head_dim)")
    theta = params.get("rope_theta", config.get("rope_theta", theta_default))
    kind_name = params.get("rope_type", params.get("type", "default"))
    try:
        kind = RopeKind(kind_name)
    except ValueError:
        kind = None
    if kind is None or kind == RopeKind.LONGROPE:  # longrope: not yet read from Hugging Face configs
        kinds = ", ".join(k.value for k in RopeKind if k != RopeKind.LONGROPE)
        raise MlxcError(f"{where}: unsupported rope type {kind_name!r} in `{key}`; supported: {kinds}")

    def need(name: str) -> Any:
        if params.get(name) is None:
            raise MlxcError(f"{where}: rope type {kind.value!r} needs `{key}.{name}`")
        return params[name]

    fields: dict[str, Any] = {"theta": theta, "kind": kind}
    if kind in (RopeKind.LINEAR, RopeKind.DYNAMIC):
        fields["factor"] = need("factor")
    elif kind == RopeKind.LLAMA3:
        fields.update(
            factor=need("factor"),
            low_freq_factor=need("low_freq_factor"),
            high_freq_factor=need("high_freq_factor"),
            original_max_position_embeddings=params.get("original_max_position_embeddings") or max_pos,
        )
    elif kind == RopeKind.YARN:
        original = params.get("original_max_position_embeddings") or max_pos
        fields.update(
            # transformers: a null factor means "the context extension ratio"; null betas mean the paper's 32 / 1
            factor=params.get("factor") or max_pos / original,
            original_max_position_embeddings=original,
            beta_fast=params.get("beta_fast") or 32.0,
            beta_slow=params.get("beta_slow") or 1.0,
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=params.get("truncate", True),
        )
    try:
        return RopeSpec(**fields)
    except ValidationError as err:
        raise MlxcError(validation_message(err, f"{where} (`{key}`)")) from None


def spec_from_hf_config(
    config: Mapping[str, Any],
    name: str = "model",
    *,
    source: Optional[PathLike] = None,
    family: Optional[str] = None,
) -> ModelSpec:
    """The ModelSpec of a Hugging Face config dict.

    `source` (the file) makes error messages point somewhere; `family` skips detection, for callers that already
    ran `detect_architecture` with the checkpoint's tensor names.
    """
    where = str(source) if source is not None else "Hugging Face config"
    if family is not None and family not in _BY_FAMILY:
        raise MlxcError(f"unsupported architecture family {family!r}; supported: {_supported()}")
    arch = _BY_FAMILY[family or detect_architecture(config)]
    for key in _REQUIRED:
        if config.get(key) is None:
            raise MlxcError(f"{where}: missing required key `{key}`")

    def get(key: str) -> Any:
        """Present keys keep their value, null included (Mistral's `sliding_window: null` means full attention)."""
        return config[key] if key in config else arch.defaults[key]

    act_name = get("hidden_act")
    if act_name not in _ACTIVATIONS:
        raise MlxcError(
            f"{where}: unsupported hidden_act {act_name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    max_pos = get("max_position_embeddings")
    eos = get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    fields: dict[str, Any] = dict(
        name=name,
        family=arch.family,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=get("num_key_value_heads"),
        head_dim=get("head_dim") or None,  # transformers treats 0/null as "derive it"
        max_position_embeddings=max_pos,
        norm_eps=get("rms_norm_eps"),
        activation=_ACTIVATIONS[act_name],
        rope=_rope(config, max_pos if isinstance(max_pos, int) else 1, arch.defaults["rope_theta"], where),
        attention_bias=bool(get("attention_bias")) if arch.biases else False,
        mlp_bias=bool(get("mlp_bias")) if arch.biases else False,
        sliding_window=get("sliding_window") if arch.sliding_window else None,
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        bos_token_id=get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=get("pad_token_id"),
    )
    try:
        return ModelSpec(**fields)
    except ValidationError as err:
        raise MlxcError(validation_message(err, where, _HF_KEY)) from None


def load_hf_spec(path: PathLike, name: Optional[str] = None) -> ModelSpec:
    """ModelSpec of a checkpoint directory (or its config.json); the name defaults to the directory's name."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    return spec_from_hf_config(load_hf_config(file), name or file.resolve().parent.name, source=file)


_HF_ACTIVATION: Final[Mapping[Activation, str]] = {
    Activation.SILU: "silu", Activation.GELU: "gelu", Activation.GELU_TANH: "gelu_pytorch_tanh",
    Activation.RELU: "relu",
}
_ARCH_CLASS: Final[Mapping[str, str]] = {a.family: a.architectures[0] for a in ARCHITECTURES}


def _rope_parameters(spec: ModelSpec) -> dict[str, Any]:
    """`rope_parameters` (transformers 5) for the spec's rope; `_rope` reads it back to the same RopeSpec."""
    r = spec.rope
    out: dict[str, Any] = {"rope_type": r.kind.value, "rope_theta": r.theta}
    if r.kind in (RopeKind.LINEAR, RopeKind.DYNAMIC):
        out["factor"] = r.factor
    elif r.kind == RopeKind.LLAMA3:
        out.update(factor=r.factor, low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                   original_max_position_embeddings=r.original_max_position_embeddings or spec.max_position_embeddings)
    elif r.kind == RopeKind.YARN:
        out.update(factor=r.factor, beta_fast=r.beta_fast, beta_slow=r.beta_slow,
                   original_max_position_embeddings=r.original_max_position_embeddings or spec.max_position_embeddings)
        out.update({k: v for k in ("attention_factor", "mscale", "mscale_all_dim") if (v := getattr(r, k)) is not None})
        if not r.truncate:
            out["truncate"] = False
    return out


def hf_config_from_spec(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` transformers builds this spec's model from (the inverse of `spec_from_hf_config`).

    Llama unless every layer uses one sliding window (Mistral, which has no biases). A spec transformers' Llama or
    Mistral cannot express (layer norm, a dense FFN, no rotary embedding, an output bias without the others, some
    layers windowed and others not) is an MlxcError naming what has no equivalent.
    """
    from .spec import AttentionType, BlockKind, FFNType, NormType, PositionEmbedding

    problems = []
    if spec.norm != NormType.RMS:
        problems.append(f"{spec.norm.value} norm (Llama and Mistral use RMSNorm)")
    if spec.ffn != FFNType.GATED:
        problems.append(f"a {spec.ffn.value} FFN (Llama and Mistral use a gated MLP)")
    if spec.position != PositionEmbedding.ROPE:
        problems.append(f"position embedding {spec.position.value!r} (Llama and Mistral use rotary embeddings)")
    if spec.out_bias != spec.attention_bias:
        problems.append("an attention output bias that differs from the q/k/v biases (`attention_bias` sets all four)")
    if any(layer.block != BlockKind.ATTENTION for layer in spec.layers):
        problems.append("layers that are not attention blocks")
    windowed = [layer.attention == AttentionType.SLIDING_WINDOW for layer in spec.layers]
    family = spec.family if spec.family in _ARCH_CLASS else "llama"
    if any(windowed):
        if not all(windowed):
            problems.append("sliding-window attention on some layers only")
        elif spec.attention_bias or spec.mlp_bias:
            problems.append("sliding-window attention together with biases (Mistral has no biases)")
        family = "mistral"
    elif family == "mistral" and (spec.attention_bias or spec.mlp_bias):
        family = "llama"  # Mistral's modeling code ignores the bias keys; Llama's honours them
    if problems:
        raise MlxcError(f"model {spec.name!r} has no Hugging Face (Llama/Mistral) equivalent: {'; '.join(problems)}")
    eos = list(spec.eos_token_ids)
    rope = _rope_parameters(spec)
    config: dict[str, Any] = {
        "architectures": [_ARCH_CLASS[family]],
        "model_type": family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.dim_per_head,
        "hidden_act": _HF_ACTIVATION[spec.activation],
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
        # transformers 5 reads rope_parameters; transformers 4 and mlx-lm read rope_theta and rope_scaling
        "rope_parameters": rope,
        "rope_theta": spec.rope.theta,
        "rope_scaling": None if spec.rope.kind == RopeKind.DEFAULT else {k: v for k, v in rope.items()
                                                                         if k != "rope_theta"},
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if family == "mistral":
        config["sliding_window"] = spec.sliding_window if any(windowed) else None
    else:
        config.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Tensor names

UNMAPPED: Final[str] = "<unmapped>"
"""Returned by `hf_to_ir_name` for a tensor no rule knows: never a valid IR name, so the loader can report it."""

# One table for both directions: (Hugging Face name, IR name). A `{field}` is a layer index (`i`) or one of the
# alternatives `_FIELDS` lists, and stands for the same text on both sides.
_NAMES: Final[tuple[tuple[str, str], ...]] = (
    ("model.embed_tokens.weight", "embed_tokens.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
    ("model.layers.{i}.self_attn.{qkvo}_proj.{kind}", "layers.{i}.attn.{qkvo}_proj.{kind}"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
    ("model.layers.{i}.mlp.{mlp}_proj.{kind}", "layers.{i}.mlp.{mlp}_proj.{kind}"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_FIELDS: Final[Mapping[str, str]] = {"i": r"\d+", "qkvo": "[qkvo]", "kind": "weight|bias", "mlp": "gate|up|down"}
# Rotary tables are recomputed from the config; old checkpoints stored them.
_IGNORED: Final = re.compile(r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def _pattern(template: str, optional_model_prefix: bool = False) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    body = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts))
    if optional_model_prefix and body.startswith(re.escape("model.")):
        # checkpoints of the bare decoder (LlamaModel) have no `model.` prefix
        body = "(?:model\\.)?" + body[len(re.escape("model.")):]
    return re.compile(body)


_TO_IR: Final = tuple((_pattern(hf_name, True), ir_name) for hf_name, ir_name in _NAMES)
_TO_HF: Final = tuple((_pattern(ir_name), hf_name) for hf_name, ir_name in _NAMES)


def hf_to_ir_name(hf_name: str) -> Optional[str]:
    """The IR parameter name for a checkpoint tensor; None if deliberately ignored; `UNMAPPED` if unknown."""
    if _IGNORED.fullmatch(hf_name):
        return None
    for pattern, template in _TO_IR:
        m = pattern.fullmatch(hf_name)
        if m:
            return template.format(**m.groupdict())
    return UNMAPPED


def ir_to_hf_name(ir_name: str) -> str:
    """The Hugging Face (Llama-layout) name of an IR parameter; MlxcError if it has none."""
    for pattern, template in _TO_HF:
        m = pattern.fullmatch(ir_name)
        if m:
            return template.format(**m.groupdict())
    raise MlxcError(f"IR parameter {ir_name} has no Hugging Face name")
