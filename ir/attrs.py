"""Structured attribute values that ops carry (beyond ints, floats, strings and shapes).

They live in `ir` because an op's attributes are part of the IR's meaning; frontends build them and codegen reads
them, so both depend on this one definition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class RopeKind(str, enum.Enum):
    """How rotary frequencies are derived from the base (the `rope_type` of a Hugging Face config)."""

    DEFAULT = "default"
    LINEAR = "linear"
    DYNAMIC = "dynamic"
    LLAMA3 = "llama3"
    YARN = "yarn"
    LONGROPE = "longrope"


class Kernel(str, enum.Enum):
    """Which implementation runs an op that has several (`linear {kernel = native}`); `select-kernels` chooses per
    target, and codegen writes the matching fragment. `reference` is plain MLX ops, everywhere."""

    REFERENCE = "reference"
    NATIVE = "native"  # mlxc's C++ CPU kernels (kernels/native), with the reference as fallback
    METAL = "metal"  # a custom Metal kernel (Apple GPU)
    CUDA = "cuda"  # its CUDA twin
    EMULATED = "emulated"  # the Metal kernel's exact source run in the kernel emulator (tests, on any machine)


@dataclass(frozen=True)
class RopeScaling:
    """Rotary position embedding parameters: enough to recompute the inverse frequencies exactly.

    Only the fields a kind uses are meaningful; the others keep their defaults so that printing stays short.
    """

    kind: RopeKind = RopeKind.DEFAULT
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3 / yarn / dynamic: the context length the model was trained at
    original_max_position_embeddings: int = 0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope: per-frequency divisors of the rotary frequencies, within / beyond the original context
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Canonical field types, so printing and parsing agree (configs often give `factor: 8` as an int).
        object.__setattr__(self, "kind", RopeKind(self.kind))
        for name in _ROPE_FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
        for name in ("short_factor", "long_factor"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))

    def non_default_items(self) -> list[tuple[str, object]]:
        """(name, value) pairs that differ from the defaults, `kind` always first."""
        default = RopeScaling()
        items: list[tuple[str, object]] = [("kind", self.kind)]
        for f in fields(self):
            if f.name != "kind" and getattr(self, f.name) != getattr(default, f.name):
                items.append((f.name, getattr(self, f.name)))
        return items


_ROPE_FLOAT_FIELDS = (
    "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
    "attention_factor", "mscale", "mscale_all_dim",
)

# Every structured attribute type, by the tag it prints with: `#rope<kind = llama3, factor = 8.0>`.
STRUCT_ATTRS: dict[str, type] = {"rope": RopeScaling}
STRUCT_TAGS: dict[type, str] = {cls: tag for tag, cls in STRUCT_ATTRS.items()}
