"""Hugging Face checkpoints: `config.json` to ModelSpec, and checkpoint tensor names to mlxc's IR parameter names.

Both transformers-4 configs (top-level `rope_theta`, `rope_scaling`) and transformers-5 configs (`rope_parameters`
holding `rope_theta` and `rope_type`) are read. Keys a config omits take the value transformers' own config class
for that family would give them, so the spec describes the model transformers would build from the same file.
What differs between families lives in their files (frontends/families/); this module is the shared machinery.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Iterable, Mapping, Optional, Union

from pydantic import ValidationError

from ..ir.attrs import RopeKind
from ..ir.errors import MlxcError
from .families import UNMAPPED, Family, all_families, family as family_named
from .spec import Activation, HeadKind, HeadSpec, ModelSpec, ProblemType, RopeSpec
from .spec_file import validation_message

PathLike = Union[str, Path]

__all__ = [
    "Detection", "HFConfig", "UNMAPPED", "detect_architecture", "detect_family", "hf_config_from_spec",
    "hf_to_ir_name", "ir_to_hf_name", "load_hf_config", "load_hf_spec", "read_rope", "spec_from_hf_config",
]

REQUIRED: Final = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

ACTIVATIONS: Final[Mapping[str, Activation]] = {
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "gelu": Activation.GELU,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_new": Activation.GELU_TANH,
    "gelu_fast": Activation.GELU_TANH,
    "relu": Activation.RELU,
}
HF_ACTIVATION: Final[Mapping[Activation, str]] = {
    Activation.SILU: "silu", Activation.GELU: "gelu", Activation.GELU_TANH: "gelu_pytorch_tanh",
    Activation.RELU: "relu",
}

# Spec field -> the Hugging Face key it came from, so validation errors name what the user can see in the file.
HF_KEY: Final[Mapping[str, str]] = {
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

# transformers' task classes: `<Stem><suffix>`, and the head each one has
TASKS: Final[Mapping[str, HeadKind]] = {
    "ForCausalLM": HeadKind.CAUSAL_LM,
    "ForSequenceClassification": HeadKind.SEQUENCE_CLASSIFICATION,
    "ForTokenClassification": HeadKind.TOKEN_CLASSIFICATION,
    "Model": HeadKind.CAUSAL_LM,  # a bare backbone: an LM head tied or absent, as `LlamaModel` checkpoints are
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
    except UnicodeDecodeError:
        raise MlxcError(f"{p}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MlxcError(f"{p}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise MlxcError(f"{p}: malformed JSON (nested too deep)") from None
    if not isinstance(data, dict):
        raise MlxcError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def _supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(a + 'ForCausalLM' for a in f.architectures)})" for f in all_families()
                     if f.architectures)  # families without a Hugging Face class (hybrid) have no config to read


def _split_architecture(name: str) -> tuple[str, Optional[HeadKind]]:
    """`Qwen2ForSequenceClassification` -> ("Qwen2", SEQUENCE_CLASSIFICATION)."""
    for suffix, kind in TASKS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], kind
    return name, None


@dataclass(frozen=True)
class Detection:
    """Which family a model is and the evidence, so `mlxc inspect` can say why a checkpoint reads as it does.

    `via` is where the answer came from (`architectures`, `model_type`, `tensor names`, a preset, ...) and
    `evidence` the entries that decided it (the class name, the model type, the tensor-name patterns matched)."""

    family: str
    via: str
    evidence: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.family} (from {self.via}" + (f": {', '.join(self.evidence)})" if self.evidence else ")")


def detect_architecture(config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> str:
    """The family name for a checkpoint (see `detect_family`)."""
    return detect_family(config, tensor_names).family


def detect_family(config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> Detection:
    """The family of a checkpoint and how it was found: the `architectures` entries first, then `model_type`, and
    only when the config has neither, the tensor names (`_detect_from_tensors`)."""
    declared = config.get("architectures") or []
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, (list, tuple)):
        raise MlxcError(f"config.json: architectures should be a list of class names, not {declared!r:.80}")
    families = all_families()
    for name in declared:
        stem, _ = _split_architecture(str(name))
        for f in families:
            if stem in f.architectures:
                return Detection(f.name, "architectures", (str(name),))
    model_type = config.get("model_type")
    for f in families:
        if model_type in f.model_types:
            return Detection(f.name, "model_type", (str(model_type),))
    # Tensor names only stand in for missing metadata: a config that declares an unsupported architecture must not
    # load as a family whose tensor names merely look alike.
    if tensor_names is not None and not declared and model_type is None:
        return _detect_from_tensors(list(tensor_names))
    seen = f"architectures={list(declared)}, model_type={model_type!r}"
    raise MlxcError(f"unsupported architecture ({seen}); supported: {_supported()}")


def _shape_of(name: str) -> str:
    """A tensor name with its indices as `*` (`model.layers.*.self_attn.q_proj.bias`): what evidence shows."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


def _detect_from_tensors(names: list[str]) -> Detection:
    """The most specific family the tensor names fit.

    A family fits when each of its `tensor_markers` matches some tensor and its name table maps every tensor (a
    Gemma 2 checkpoint's `pre_feedforward_layernorm` rules Llama out). Of the families that fit, the one whose
    markers match a strict superset of the tensors every other fitting family's markers match wins: a Qwen2
    checkpoint fits Llama's markers too, but Qwen2's (Llama's plus the q/k/v biases) match more. Fitting families
    with equal or incomparable evidence are ambiguous, an error: names alone cannot tell them apart.
    """
    evidence: dict[str, frozenset[str]] = {}
    for f in all_families():
        if not f.tensor_markers:
            continue
        matched: set[str] = set()
        for marker in f.tensor_markers:
            pattern = re.compile(marker)
            hits = {n for n in names if pattern.fullmatch(n)}
            if not hits:
                break
            matched |= hits
        else:
            table = f.names or _names(None)
            if all(table.to_ir(n) != UNMAPPED for n in names):
                evidence[f.name] = frozenset(matched)
    best = [f for f, mine in evidence.items() if all(other <= mine for other in evidence.values())]
    if len(best) == 1:
        return Detection(best[0], "tensor names", tuple(sorted({_shape_of(n) for n in evidence[best[0]]})))
    if evidence:
        fits = "; ".join(f"{f} ({', '.join(sorted({_shape_of(n) for n in ev}))})" for f, ev in evidence.items())
        raise MlxcError(f"the tensor names fit several families and none more specifically than the others: {fits}; "
                        "the config names no `architectures` or `model_type` to decide (add one)")
    raise MlxcError(f"unsupported architecture: the config names no `architectures` or `model_type`, and the tensor "
                    f"names ({len(names)}, e.g. {', '.join(sorted(names)[:3])}) fit no family; supported: "
                    f"{_supported()}")


def read_rope(config: Mapping[str, Any], max_pos: int, theta_default: float, where: str) -> RopeSpec:
    """RopeSpec from either `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).

    Like transformers, a non-empty `rope_scaling` wins, `rope_theta` inside the dict wins over the top-level key,
    and llama3/yarn/longrope without `original_max_position_embeddings` measure against `max_position_embeddings`.
    """
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(key) or {}
    if not isinstance(params, Mapping):
        raise MlxcError(f"{where}: `{key}` must be an object, got {params!r}")
    if not {"rope_type", "type", "rope_theta"} & params.keys() and any(isinstance(v, Mapping) for v in params.values()):
        raise MlxcError(f"{where}: per-layer-type `{key}` is not supported for this architecture")
    theta = params.get("rope_theta", config.get("rope_theta", theta_default))
    kind_name = params.get("rope_type", params.get("type", "default"))
    try:
        kind = RopeKind(kind_name)
    except ValueError:
        kind = None
    if kind is None:
        kinds = ", ".join(k.value for k in RopeKind)
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
    elif kind == RopeKind.LONGROPE:
        original = params.get("original_max_position_embeddings") or max_pos
        short, long = need("short_factor"), need("long_factor")
        for name, factors in (("short_factor", short), ("long_factor", long)):
            if not isinstance(factors, (list, tuple)) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in factors):
                raise MlxcError(f"{where}: `{key}.{name}` must be a list of positive numbers, got {factors!r}")
        if len(short) != len(long):
            raise MlxcError(f"{where}: `{key}.short_factor` has {len(short)} entries but `long_factor` has "
                            f"{len(long)}; both need one per rotary frequency")
        fields.update(
            # transformers: without `factor`, the extension ratio sets the attention scaling
            factor=params.get("factor") or max_pos / original,
            original_max_position_embeddings=original,
            attention_factor=params.get("attention_factor"),
            short_factor=tuple(short),
            long_factor=tuple(long),
        )
    try:
        return RopeSpec(**fields)
    except ValidationError as err:
        raise MlxcError(validation_message(err, f"{where} (`{key}`)")) from None


class HFConfig:
    """A config.json as one family's transformers config class reads it: a present key keeps its value (null
    included: Mistral's `sliding_window: null` means full attention), a missing one takes the family's default.
    Errors name the file."""

    def __init__(self, data: Mapping[str, Any], family: Family, where: str):
        self.data, self.family, self.where = data, family, where

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.data:
            return self.data[key]
        return self.family.defaults.get(key, default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise MlxcError(f"{self.where}: missing required key `{key}`")
        return value

    def error(self, message: str) -> MlxcError:
        return MlxcError(f"{self.where}: {message}")

    def activation(self, key: str = "hidden_act") -> Activation:
        name = self.get(key)
        if not isinstance(name, str) or name not in ACTIVATIONS:
            raise self.error(f"unsupported {key} {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
        return ACTIVATIONS[name]

    def rope(self, data: Optional[Mapping[str, Any]] = None) -> RopeSpec:
        """The rope of the config (or of `data`, e.g. one layer type's parameters), with the family's theta."""
        max_pos = self.get("max_position_embeddings")
        return read_rope(self.data if data is None else data, max_pos if isinstance(max_pos, int) else 1,
                         self.get("rope_theta", 10000.0), self.where)

    def eos_ids(self) -> tuple:
        eos = self.get("eos_token_id")
        return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)

    def head(self) -> HeadSpec:
        """The task head the declared architecture has (`*ForSequenceClassification`: a `score` layer over the last
        non-padding token), with transformers' label count and problem type."""
        declared = self.data.get("architectures") or []
        kinds = [_split_architecture(str(a))[1] for a in ([declared] if isinstance(declared, str) else declared)]
        kind = next((k for k in kinds if k is not None), HeadKind.CAUSAL_LM)
        if kind == HeadKind.CAUSAL_LM:
            return HeadSpec()
        labels = self.data.get("id2label")
        num = len(labels) if isinstance(labels, Mapping) and labels else self.data.get("num_labels", 2)
        problem = self.data.get("problem_type")
        try:
            problem = ProblemType(problem) if problem is not None else None
        except ValueError:
            raise self.error(f"unknown problem_type {problem!r}") from None
        return HeadSpec(kind=kind, num_labels=num, problem_type=problem,
                        # transformers' token classifier has a biased score layer unless the config says not
                        bias=kind == HeadKind.TOKEN_CLASSIFICATION
                        and bool(self.data.get("token_classification_bias", True)))

    def common(self) -> dict[str, Any]:
        """The ModelSpec fields every decoder family reads the same way (Llama's keys)."""
        for key in REQUIRED:
            self.need(key)
        return dict(
            vocab_size=self.data["vocab_size"],
            hidden_size=self.data["hidden_size"],
            intermediate_size=self.data["intermediate_size"],
            num_layers=self.data["num_hidden_layers"],
            num_heads=self.data["num_attention_heads"],
            num_kv_heads=self.get("num_key_value_heads"),
            head_dim=self.get("head_dim") or None,  # transformers treats 0/null as "derive it"
            max_position_embeddings=self.get("max_position_embeddings"),
            norm_eps=self.get("rms_norm_eps"),
            activation=self.activation(),
            rope=self.rope(),
            partial_rotary_factor=self.get("partial_rotary_factor", 1.0),
            # only an LM head can be tied; a classifier's `score` never is, whatever the family's default says
            tie_word_embeddings=bool(self.get("tie_word_embeddings")) and self.head().kind == HeadKind.CAUSAL_LM,
            bos_token_id=self.get("bos_token_id"),
            eos_token_ids=self.eos_ids(),
            pad_token_id=self.get("pad_token_id"),
            head=self.head(),
        )


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
    fam = family_named(family or detect_architecture(config))
    reader = HFConfig(config, fam, where)
    fields = fam.config(reader)
    try:
        return ModelSpec(name=name, family=fam.name, **fields)
    except ValidationError as err:
        raise MlxcError(validation_message(err, where, HF_KEY)) from None


def load_hf_spec(path: PathLike, name: Optional[str] = None) -> ModelSpec:
    """ModelSpec of a checkpoint directory (or its config.json); the name defaults to the directory's name."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    return spec_from_hf_config(load_hf_config(file), name or file.resolve().parent.name, source=file)


def hf_config_from_spec(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` transformers builds this spec's model from (the inverse of `spec_from_hf_config`); an
    MlxcError when the family has no writer or the spec has no Hugging Face equivalent."""
    fam = family_named(spec.family) if spec.family in {f.name for f in all_families()} else family_named("llama")
    if fam.to_hf_config is None:
        raise MlxcError(f"exporting a {fam.name} model to the Hugging Face format is not supported yet")
    config = {**fam.to_hf_config(spec), "dtype": dtype, "torch_dtype": dtype}
    _check_expressible(spec, config)
    return config


def _check_expressible(spec: ModelSpec, config: Mapping[str, Any]) -> None:
    """A family writer states what it knows; whatever else the spec says (a layer norm, a dense FFN, windows on some
    layers only, ...) would be lost. The config is faithful when the model it reads back to lowers to the same IR
    as the spec; otherwise the error names the spec fields the config cannot carry."""
    from ..ir import print_program
    from .lower import lower

    try:
        back = spec_from_hf_config(config, name=spec.name)
    except MlxcError as err:
        raise MlxcError(f"model {spec.name!r} has no Hugging Face equivalent: {err}") from None
    if print_program(lower(back)) == print_program(lower(spec)):
        return
    ours, theirs = spec.model_dump(mode="json"), back.model_dump(mode="json")
    lost = []
    for key, value in ours.items():
        other = theirs.get(key)
        if key in ("name", "family") or value is None or value == other:
            continue
        if isinstance(value, list) and isinstance(other, list) and len(value) == len(other) and \
                all(isinstance(x, dict) for x in value + other):  # per-layer entries: the fields that differ
            for field in dict.fromkeys(f for a, b in zip(value, other) for f in a if a[f] != b.get(f)):
                lost.append(f"{key}[*].{field} {_shown([a[field] for a in value])} "
                            f"(the config gives {_shown([b.get(field) for b in other])})")
        else:
            lost.append(f"{key} {_shown(value)} (the config gives {_shown(other)})")
    detail = "; ".join(lost) or "its lowered program differs from the one the config describes"
    raise MlxcError(f"model {spec.name!r} has no Hugging Face ({config['architectures'][0]}) equivalent: {detail}")


def _shown(value: Any) -> str:
    """A spec value in an error message, long ones shortened."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rope_parameters(spec: ModelSpec, rope: Optional[RopeSpec] = None) -> dict[str, Any]:
    """`rope_parameters` (transformers 5) for a rope; `read_rope` reads it back to the same RopeSpec."""
    r = rope or spec.rope
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
    elif r.kind == RopeKind.LONGROPE:
        out.update(factor=r.factor, short_factor=list(r.short_factor or ()), long_factor=list(r.long_factor or ()),
                   original_max_position_embeddings=r.original_max_position_embeddings or spec.max_position_embeddings)
        if r.attention_factor is not None:
            out["attention_factor"] = r.attention_factor
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tensor names


def _names(family: Optional[str]):
    fam = family_named(family or "llama")
    return fam.names or family_named("llama").names


def hf_to_ir_name(hf_name: str, family: Optional[str] = None) -> Optional[str]:
    """The IR parameter name for a checkpoint tensor (Llama's names unless `family` says otherwise); None if
    deliberately ignored; `UNMAPPED` if unknown."""
    return _names(family).to_ir(hf_name)


def ir_to_hf_name(ir_name: str, family: Optional[str] = None) -> str:
    """The Hugging Face name of an IR parameter; MlxcError if it has none."""
    return _names(family).to_checkpoint(ir_name)
