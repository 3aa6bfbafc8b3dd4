"""What a model family is to mlxc: one `Family` value, declared in one file of this package.

A family file holds everything about its family: how its Hugging Face config maps onto a ModelSpec (`config`),
its checkpoint tensor names in both directions (`names`), how its checkpoints lay tensors out when that differs
from the lowered program (`layout`), how to recognise it (architecture classes, `model_type`, tensor markers),
its GGUF architecture when llama.cpp defines one (`gguf`), its presets and the hub ids that name them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from ...ir.errors import MlxcError
from ...ir.layout import LayoutRule
from ..spec import ModelSpec

if TYPE_CHECKING:
    from ..gguf import GGUFArch
    from ..hf import HFConfig

# Field alternatives every name table may use; a family adds its own.
COMMON_FIELDS: Mapping[str, str] = {"i": r"\d+", "kind": "weight|bias", "qkvo": "[qkvo]", "mlp": "gate|up|down"}


class NameTable:
    """Checkpoint <-> IR tensor names from one table of (checkpoint template, IR template) rows.

    A `{field}` stands for the same text on both sides: a layer index `{i}`, or one of the alternatives `fields`
    lists. Checkpoint names may carry the task model's `model.` prefix or not (a bare backbone has none).
    """

    def __init__(self, rows: tuple[tuple[str, str], ...], fields: Mapping[str, str] = (), ignored: str = ""):
        self.rows = rows
        self.fields = {**COMMON_FIELDS, **dict(fields)}
        self._to_ir = tuple((self._pattern(ckpt, True), ir) for ckpt, ir in rows)
        self._to_ckpt = tuple((self._pattern(ir, False), ckpt) for ckpt, ir in rows)
        self._ignored = re.compile(ignored) if ignored else None

    def _pattern(self, template: str, optional_model_prefix: bool) -> re.Pattern[str]:
        parts = re.split(r"\{(\w+)\}", template)
        body = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{self.fields[p]})" for k, p in enumerate(parts))
        if optional_model_prefix and body.startswith(re.escape("model.")):
            body = "(?:model\\.)?" + body[len(re.escape("model.")):]
        return re.compile(body)

    def to_ir(self, name: str) -> Optional[str]:
        """The IR name of a checkpoint tensor; None if deliberately ignored; UNMAPPED if unknown."""
        if self._ignored is not None and self._ignored.fullmatch(name):
            return None
        for pattern, template in self._to_ir:
            m = pattern.fullmatch(name)
            if m:
                return template.format(**m.groupdict())
        return UNMAPPED

    def to_checkpoint(self, ir_name: str) -> str:
        for pattern, template in self._to_ckpt:
            m = pattern.fullmatch(ir_name)
            if m:
                return template.format(**m.groupdict())
        raise MlxcError(f"IR parameter {ir_name} has no Hugging Face name")


UNMAPPED = "<unmapped>"
"""What `NameTable.to_ir` returns for a tensor no row knows: never a valid IR name, so loaders can report it."""

# Every task model's head, whatever the family.
HEAD_NAMES: tuple[tuple[str, str], ...] = (
    ("lm_head.weight", "lm_head.weight"),
    ("score.{kind}", "score.{kind}"),
)


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring). Only `name`, `architectures` and `config` are required."""

    name: str
    # Hugging Face class-name stems: `Llama` covers LlamaForCausalLM, LlamaForSequenceClassification, ...
    architectures: tuple[str, ...]
    # Hugging Face config -> ModelSpec fields (the reader knows the family's defaults and where errors point)
    config: Callable[["HFConfig"], dict[str, Any]]
    model_types: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)  # transformers' config-class defaults
    names: Optional[NameTable] = None  # None: Llama's table
    layout: Optional[Callable[[ModelSpec], tuple[LayoutRule, ...]]] = None  # how its HF checkpoints store tensors
    tensor_markers: tuple[str, ...] = ()  # regexes that must each match some tensor (detection without metadata)
    gguf: Optional["GGUFArch"] = None
    presets: tuple[ModelSpec, ...] = ()
    hub_ids: tuple[tuple[str, str], ...] = ()  # (regex over a hub id, preset name): offline architecture lookups
    to_hf_config: Optional[Callable[[ModelSpec], dict[str, Any]]] = None  # the inverse of `config`, for export

    def checkpoint_layout(self, spec: ModelSpec) -> tuple[LayoutRule, ...]:
        return self.layout(spec) if self.layout is not None else ()
