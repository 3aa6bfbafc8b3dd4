"""How a checkpoint lays out a program's parameters, as data: the frontends describe it, the `checkpoint-layout`
pass turns it into load-time (`derive`) ops, so dumps, artifacts and later passes all see the transforms.

Names are function-local parameter names (`q_proj.weight` in an attention function); a rule applies in every
function that has the parameters it names. The values the body reads keep their role names (`q_proj.weight`), and
the checkpoint's own tensors become the parameters (`qkv_proj.weight`, `experts.0.gate_proj.weight`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class SplitParam:
    """The checkpoint stores `parts` concatenated along `axis` as one tensor `stored` (Phi-3's `qkv_proj`). With
    `groups` > 1 the concatenation is per group: `groups` blocks each holding every part's share in turn (BLOOM's
    `query_key_value`: per head its q, k and v rows)."""

    stored: str
    parts: tuple[str, ...]
    axis: int = 0
    groups: int = 1


@dataclass(frozen=True)
class StackParams:
    """The checkpoint stores `param` [n, ...] as n tensors named by `parts` with `{}` for the index (one per
    expert)."""

    param: str
    parts: str


@dataclass(frozen=True)
class DeinterleaveRows:
    """The checkpoint stores `param`'s rows in llama.cpp's rotary order under the name `stored`: within each of
    `groups` row groups (heads), the two halves interleaved."""

    param: str
    stored: str
    groups: int


@dataclass(frozen=True)
class ShiftParam:
    """The checkpoint stores `param + offset` under the name `stored` (llama.cpp's Gemma norms hold 1 + w)."""

    param: str
    stored: str
    offset: float


LayoutRule = Union[SplitParam, StackParams, DeinterleaveRows, ShiftParam]
