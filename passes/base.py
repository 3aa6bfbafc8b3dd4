"""What a pass is: a named Program -> Program rewrite that reports what it changed."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from ..ir import Program


@dataclass
class PassReport:
    name: str
    changes: dict[str, int] = field(default_factory=dict)
    seconds: float | None = field(default=None, compare=False)  # the pass and the verifier after it (run_pipeline)

    def __str__(self) -> str:
        done = ", ".join(f"{k}: {v}" for k, v in self.changes.items() if v) or "no changes"
        return f"{self.name}: {done}"


@dataclass(frozen=True)
class Pass:
    """Valid IR in, valid IR out; the pipeline verifies after every pass."""

    name: ClassVar[str] = ""
    # The order constraint the pipeline checks: passes this one must precede, and why.
    runs_before: ClassVar[tuple[str, ...]] = ()
    order_reason: ClassVar[str] = ""

    def run(self, program: Program) -> tuple[Program, PassReport]:
        raise NotImplementedError

    def describe(self) -> str:
        """The name, with the settings that differ from the defaults: `quantize{bits=8}`."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.compare
                   and f.default is not getattr(self, f.name) and f.default != getattr(self, f.name)]
        return self.name + ("{" + ", ".join(changed) + "}" if changed else "")
