"""What a pass is: a named Program -> Program rewrite that reports what it changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..ir import Program


@dataclass
class PassReport:
    name: str
    changes: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        done = ", ".join(f"{k}: {v}" for k, v in self.changes.items() if v) or "no changes"
        return f"{self.name}: {done}"


@dataclass(frozen=True)
class Pass:
    """Valid IR in, valid IR out; the pipeline verifies after every pass."""

    name: ClassVar[str] = ""

    def run(self, program: Program) -> tuple[Program, PassReport]:
        raise NotImplementedError
