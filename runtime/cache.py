"""Per-layer state at run time: the state classes every generated module defines, and the model-wide cache.

The classes (KV caches and `ArrayState`) are written once, in `codegen/templates/state.py.j2`: a generated module
carries them so it runs without mlxc, and this module defines the same source for the runtime's own use. Every state
answers one protocol: `rewindable`, `trim(n)` / `can_trim(n)`, `snapshot()` / `restore(s)`, `reset()`, `nbytes`.

`ModelCache` holds one state per stateful op of a model plus the position where the next call's tokens start, which
the runtime passes to the model as its explicit `offset` input. It rewinds a step the way each state allows: a KV
cache forgets positions, a recurrent summary goes back to a snapshot taken before the step.
"""

from __future__ import annotations

from mlxc.codegen.module import helper_namespace
from mlxc.ir.errors import MlxcError

_STATE = helper_namespace(["state"])
KVCache = _STATE["KVCache"]
RotatingKVCache = _STATE["RotatingKVCache"]
ArrayState = _STATE["ArrayState"]
new_state = _STATE["new_state"]


def check_max_kv_size(n) -> int | None:
    """None (unbounded) or a positive number of positions a query may see, itself included."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MlxcError(f"max_kv_size must be a positive integer (positions kept in the KV cache), got {n!r}")
    return n


def make_caches(windows: list[int | None], max_kv_size: int | None = None) -> list:
    """One KV cache per attention layer: `None` means full attention, an int the layer's sliding window; `max_kv_size`
    bounds every layer (mlx-lm's `--max-kv-size`)."""
    limit = check_max_kv_size(max_kv_size)
    return [new_state("kv", w, limit) for w in windows]


class ModelCache(list):
    """A model's states, in the order its generated `make_cache` lists them, and `offset`: how many positions they
    hold, i.e. where the next call's tokens start."""

    def __init__(self, states=()):
        super().__init__(states)
        self.offset = 0

    def snapshot(self):
        """What `rewind` needs to take back the next step: the offset and each non-rewindable state's snapshot."""
        return self.offset, [None if s.rewindable else s.snapshot() for s in self]

    def can_rewind(self, n: int, snapshot=None) -> bool:
        """Whether `rewind(n, snapshot)` is possible: every KV state still holds what it needs, and a snapshot taken
        `n` positions ago covers the rest."""
        if snapshot is not None and snapshot[0] != self.offset - n:
            return False
        return all(s.can_trim(n) if s.rewindable else snapshot is not None or n == 0 for s in self)

    def rewind(self, n: int, snapshot=None) -> None:
        """Forget the newest `n` positions: KV states trim, the others restore `snapshot` (taken `n` positions ago).
        Refuses rather than leave a state silently out of step."""
        if n == 0:
            return
        if not self.can_rewind(n, snapshot):
            raise MlxcError(f"cannot take back {n} positions: this model's state cannot rewind that far "
                            "(recurrent states need a snapshot from before them; sliding windows drop old keys)")
        for state, saved in zip(self, snapshot[1] if snapshot is not None else [None] * len(self)):
            if state.rewindable:
                state.trim(n)
            else:
                state.restore(saved)
        self.offset -= n

    def reset(self) -> None:
        """Forget everything (buffers stay allocated for reuse)."""
        for s in self:
            s.reset()
        self.offset = 0

    @property
    def rewindable(self) -> bool:
        return all(s.rewindable for s in self)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self)

    def __repr__(self) -> str:
        return f"ModelCache(offset={self.offset}, states={list.__repr__(self)})"
