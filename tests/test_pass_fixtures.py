"""Pass tests as text, in the style of MLIR's lit/FileCheck and xDSL's filecheck tests: tests/pass_fixtures/*.mlxc.

A valid fixture is

    // RUN: pass1,pass2          names from mlxc.passes.PASSES (`quantize` with its defaults); `default` is
                                 DEFAULT_PIPELINE
    // optional comment lines
    <input program>
    // CHECK:
    <the exact printed program after those passes>

The input must verify; after the passes the program must verify and print exactly the CHECK text, which must itself
be canonical (parse -> print gives it back). A `*_invalid.mlxc` fixture starts with `// ERROR: <substring>`:
parsing and verifying it must raise VerifyError containing that substring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mlxc.ir import VerifyError, parse_program, print_program, verify
from mlxc.passes import DEFAULT_PIPELINE, PASSES, run_pipeline

FIXTURES = Path(__file__).parent / "pass_fixtures"
VALID = sorted(p for p in FIXTURES.glob("*.mlxc") if not p.stem.endswith("_invalid"))
INVALID = sorted(FIXTURES.glob("*_invalid.mlxc"))
RUN, CHECK, ERROR = "// RUN:", "// CHECK:", "// ERROR:"


@dataclass(frozen=True)
class Fixture:
    passes: tuple[str, ...]
    input: str
    check: str


def _read(path: Path) -> Fixture:
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith(RUN), f"{path.name}: the first line must be '{RUN} pass1,pass2'"
    names: list[str] = []
    for n in lines[0][len(RUN):].split(","):
        n = n.strip()
        names += DEFAULT_PIPELINE if n == "default" else [n]
    for n in names:
        assert n in PASSES, f"{path.name}: unknown pass {n!r}"
    marks = [i for i, line in enumerate(lines) if line.strip() == CHECK]
    assert len(marks) == 1, f"{path.name}: needs exactly one '{CHECK}' line"
    i = marks[0]
    check = "\n".join(lines[i + 1 :]) + "\n"
    assert check.strip(), f"{path.name}: empty CHECK section"
    return Fixture(tuple(names), "\n".join(lines[1:i]) + "\n", check)


def test_fixtures_exist():
    assert len(VALID) >= 15 and len(INVALID) >= 2


def test_default_pipeline_and_quantize_have_fixtures():
    """Every pass of DEFAULT_PIPELINE, and quantize, runs in at least one fixture (storage-types needs a checkpoint's
    storage map and is tested in Python, test_quantize.py)."""
    used = {n for p in VALID for n in _read(p).passes}
    missing = (set(DEFAULT_PIPELINE) | {"quantize"}) - used
    assert not missing, sorted(missing)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_pass_output_matches_check(path):
    fx = _read(path)
    program = verify(parse_program(fx.input))
    before = print_program(program)
    out = run_pipeline(program, list(fx.passes))
    verify(out)
    assert print_program(program) == before, "run_pipeline must not modify its input"
    assert print_program(out) == fx.check


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_check_text_is_canonical(path):
    check = _read(path).check
    assert print_program(verify(parse_program(check))) == check


def _expected_error(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith(ERROR), f"{path.name} must start with '{ERROR} <message substring>'"
    return first[len(ERROR):].strip()


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture_is_rejected(path):
    program = parse_program(path.read_text())
    with pytest.raises(VerifyError) as info:
        verify(program)
    assert _expected_error(path) in str(info.value)
