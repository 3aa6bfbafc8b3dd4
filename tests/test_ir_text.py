"""The IR's text, JSON and DOT forms, on the fixtures in tests/ir_fixtures/.

Valid fixtures (`*.mlxc` not ending in `_invalid`) are written in canonical form after their leading `//` comment
lines, so printing the parsed program must give back exactly their body. Each `*_invalid.mlxc` fixture starts with
`// ERROR: <substring>`: parsing and verifying it must raise ParseError or VerifyError containing that substring.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mlxc.ir import (
    MlxcError,
    ParseError,
    Program,
    VerifyError,
    from_json,
    parse_program,
    print_program,
    to_dot,
    to_json,
    to_svg,
    verify,
)

FIXTURES = Path(__file__).parent / "ir_fixtures"
VALID = sorted(p for p in FIXTURES.glob("*.mlxc") if not p.stem.endswith("_invalid"))
INVALID = sorted(FIXTURES.glob("*_invalid.mlxc"))


def _body(text: str) -> str:
    """The fixture without its leading comment lines."""
    lines = text.splitlines()
    while lines and lines[0].startswith("//"):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def _expected_error(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("// ERROR:"), f"{path.name} must start with '// ERROR: <message substring>'"
    return first[len("// ERROR:") :].strip()


def test_fixtures_exist():
    assert len(VALID) >= 3
    assert len(INVALID) >= 14


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_fixture_is_canonical(path):
    program = verify(parse_program(path.read_text()))
    assert print_program(program) == _body(path.read_text())


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_print_parse_print(path):
    text = print_program(parse_program(path.read_text()))
    again = parse_program(text)
    verify(again)
    assert print_program(again) == text


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_json_round_trip(path):
    program = verify(parse_program(path.read_text()))
    doc = to_json(program)
    back = verify(from_json(doc))
    assert print_program(back) == print_program(program)
    assert to_json(back) == doc


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_dot_has_one_cluster_per_function(path):
    program = parse_program(path.read_text())
    dot = to_dot(program)
    assert dot.count("subgraph cluster_") == len(program.functions)
    for fn in program.functions:
        assert f'label="@{fn.name}"' in dot
    if shutil.which("dot") is None:
        pytest.skip("graphviz `dot` is not installed")
    # Graphviz accepts it as DOT, and renders it.
    proc = subprocess.run(["dot", "-Tcanon"], input=dot, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    svg = to_svg(program)
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for fn in program.functions:
        assert f"@{fn.name}" in svg


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture_fails_with_message(path):
    want = _expected_error(path)
    with pytest.raises((ParseError, VerifyError)) as info:
        verify(parse_program(path.read_text()))
    assert want in str(info.value)


def test_llama_layer_called_per_layer():
    program = verify(parse_program((FIXTURES / "llama_decoder.mlxc").read_text()))
    calls = [o for o in program.main.ops if o.op == "call"]
    assert [o.attrs["prefix"] for o in calls] == ["layers.0", "layers.1"]
    names = [n for n, _ in program.parameters()]
    assert "layers.0.self_attn.q_proj.weight" in names and "layers.1.mlp.down_proj.weight" in names
    assert len(names) == 3 + 2 * 9
    rope = next(o for o in program["decoder_layer"].ops if o.op == "rope")
    assert rope.attrs["scaling"].kind.value == "llama3"
    assert rope.attrs["scaling"].factor == 8.0
    assert rope.attrs["scaling"].original_max_position_embeddings == 8192


def test_split_with_several_results_and_window():
    program = verify(parse_program((FIXTURES / "fused_qkv_sliding_window.mlxc").read_text()))
    split = next(o for o in program["block"].ops if o.op == "split")
    assert [r.name for r in split.results] == ["q", "k", "v"]
    attention = next(o for o in program["block"].ops if o.op == "attention")
    assert attention.attrs["window"] == 4096


def test_parse_errors_carry_line_and_column():
    with pytest.raises(ParseError, match=r"^line 2, column 10: unexpected character '\?'"):
        parse_program("func @main(%x: f32[4]) -> f32[4] {\n  return ?%x\n}\n")
    with pytest.raises(ParseError, match="end of input"):
        parse_program("func @main(%x: f32[4]) -> f32[4] {\n")
    with pytest.raises(ParseError, match=r"line 1, column 16: unknown dtype 'f33'"):
        parse_program("func @main(%x: f33[4]) -> f32[4] {\n  return %x\n}\n")


def test_identifiers_starting_like_inf_or_nan():
    # `inf` and `nan` are float literals, but only as whole words: a dim called `info` is an identifier.
    text = "func @main(%x: f32[info, nano]) -> f32[info, nano] {\n  return %x\n}\n"
    assert print_program(verify(parse_program(text))) == text


def test_float_literals_round_trip():
    text = (
        "func @main(%x: f32[2, 4]) -> f32[2, 4] {\n"
        "  param %w: f32[4]\n"
        "  %a = rms_norm(%x, %w) {eps = 1e-05} : f32[2, 4]\n"
        "  %b = rms_norm(%a, %w) {eps = 1.5e-07} : f32[2, 4]\n"
        "  %c = rms_norm(%b, %w) {eps = 1e+16} : f32[2, 4]\n"
        "  %d = rms_norm(%c, %w) {eps = inf} : f32[2, 4]\n"
        "  %e = rms_norm(%d, %w) {eps = -0.0} : f32[2, 4]\n"
        "  return %e\n"
        "}\n"
    )
    assert print_program(parse_program(text)) == text


def test_empty_text_has_no_main():
    with pytest.raises(VerifyError, match="no @main"):
        verify(parse_program("// nothing here\n"))


def test_duplicate_function():
    text = "func @main(%x: f32[4]) -> f32[4] {\n  return %x\n}\n"
    with pytest.raises(ParseError, match="@main defined twice"):
        parse_program(text + "\n" + text)


def test_malformed_json():
    with pytest.raises(ParseError, match="not an mlxc IR JSON"):
        from_json('{"functions": []}')
    with pytest.raises(ParseError, match="malformed IR JSON"):
        from_json('{"format": "mlxc-ir", "functions": [{"name": "main"}]}')


def test_errors_are_mlxc_errors():
    assert issubclass(ParseError, MlxcError) and issubclass(VerifyError, MlxcError)
    assert isinstance(Program(), Program)
