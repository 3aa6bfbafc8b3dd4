"""Per-layer state as part of the IR: what a stateful op keeps between calls (a KV cache, a convolution window, an
SSM or RNN hidden state).

An op declares the states it reads and writes (`op(..., state=...)` in `ops.py`); a function holds the states of its
stateful ops and of its callees, in op order, and the printed signature lists them (`state(kv, kv(window=4096))`).
Generated code builds one state object per entry (`make_cache()`), and the runtime asks each whether it can rewind.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StateKind(str, enum.Enum):
    KV = "kv"  # keys and values of every position so far (or the last `window`): a step can be taken back
    CONV = "conv"  # the last inputs of a causal convolution
    SSM = "ssm"  # a state-space recurrence's hidden state
    RECURRENT = "recurrent"  # an RNN's hidden (and cell) state


@dataclass(frozen=True)
class State:
    """One state slot. `window` bounds a KV state to the last `window` positions."""

    kind: StateKind
    window: int | None = None

    @property
    def rewindable(self) -> bool:
        """Whether the state can forget its newest positions (trim). Recurrent summaries cannot: the runtime keeps a
        snapshot or recomputes instead."""
        return self.kind == StateKind.KV

    def __str__(self) -> str:
        return self.kind.value + (f"(window={self.window})" if self.window is not None else "")

    @classmethod
    def parse(cls, text: str) -> "State":
        """The inverse of `str`: `kv`, `kv(window=7)`, `ssm`, ..."""
        name, _, rest = text.partition("(")
        try:
            kind = StateKind(name.strip())
        except ValueError:
            raise ValueError(f"unknown state kind {name.strip()!r}; expected one of "
                             f"{', '.join(k.value for k in StateKind)}") from None
        window = None
        if rest:
            key, _, value = rest.rstrip(")").partition("=")
            if key.strip() != "window" or not value.strip().isdigit():
                raise ValueError(f"bad state {text!r}; expected e.g. kv(window=4096)")
            window = int(value)
        return cls(kind, window)
