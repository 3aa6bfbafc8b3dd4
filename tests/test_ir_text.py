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

import json

from mlxc.ir import (
    DType,
    FunctionBuilder,
    MlxcError,
    ParseError,
    Program,
    Quant,
    RopeKind,
    RopeScaling,
    State,
    StateKind,
    TensorType,
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


def test_parse_and_verify_errors_are_caught_as_mlxc_errors():
    """The CLI prints any MlxcError as one line: a real parse failure and a real verify failure are both caught as one,
    and keep their own class."""
    with pytest.raises(MlxcError) as parse_info:
        parse_program("func @main(%x: f32[4]) -> f32[4] {\n  return %nope\n}\n")
    assert type(parse_info.value) is ParseError
    assert str(parse_info.value) == "line 2, column 10: use of undefined value %nope"
    with pytest.raises(MlxcError) as verify_info:
        verify(parse_program("func @main(%x: f32[4]) -> f32[4] {\n  %y = transpose(%x) {perm = [1, 0]} : f32[4]\n"
                             "  return %y\n}\n"))
    assert type(verify_info.value) is VerifyError
    assert str(verify_info.value).startswith("@main: `%y = transpose(%x) {perm = [1, 0]} : f32[4]`: ")
    assert "perm [1, 0] is not a permutation of 1 axes" in str(verify_info.value)


# A program built op by op with the builder (types inferred by the type rules, never parsed), and the text it must
# print, written by hand: defaults left out (split's axis, rope's traditional, attention's window), attributes in
# declaration order, quantized types, derive lines after params, several results, a call with a prefix, the explicit
# position offset and the states each signature keeps.
EXPECTED_BUILT = """func @layer(%x: f32[B, T, 32], %offset: i32[]) -> (f32[B, T, 32], f32[B, T, 16]) state(kv) {
  param %w.weight: f32[48, 32]
  param %norm.weight: f32[32]
  derive %w_q.weight = quantize(%w.weight) {bits = 4, group_size = 32} : f32[48, 32] q4g32
  %n = rms_norm(%x, %norm.weight) {eps = 1e-06} : f32[B, T, 32]
  %h = linear(%n, %w_q.weight) : f32[B, T, 48]
  %a, %b = split(%h) {sizes = [32, 16]} : f32[B, T, 32], f32[B, T, 16]
  %q = reshape(%a) {shape = [B, T, 4, 8]} : f32[B, T, 4, 8]
  %qt = transpose(%q) {perm = [0, 2, 1, 3]} : f32[B, 4, T, 8]
  %r = rope(%qt, %offset) {dims = 8, base = 500000.0, scaling = #rope<kind = llama3, factor = 8.0, original_max_position_embeddings = 8192>} : f32[B, 4, T, 8]
  %o = attention(%r, %r, %r) {scale = 0.125} : f32[B, 4, T, 8]
  %ot = transpose(%o) {perm = [0, 2, 1, 3]} : f32[B, T, 4, 8]
  %flat = reshape(%ot) {shape = [B, T, 32]} : f32[B, T, 32]
  %y = add(%x, %flat) : f32[B, T, 32]
  return %y, %b
}

func @main(%ids: i32[B, T], %offset: i32[]) -> f32[B, T, 32] state(kv) {
  param %embed.weight: f32[100, 32]
  %e = embed(%ids, %embed.weight) : f32[B, T, 32]
  %y, %side = call(%e, %offset) {callee = @layer, prefix = "layers.0"} : f32[B, T, 32], f32[B, T, 16]
  %g = gelu_tanh(%y) : f32[B, T, 32]
  %z = cast(%g) {dtype = bf16} : bf16[B, T, 32]
  %back = cast(%z) {dtype = f32} : f32[B, T, 32]
  return %back
}
"""


def _built() -> Program:
    program = Program()
    f32 = lambda *shape: TensorType(DType.F32, shape)  # noqa: E731
    fb = FunctionBuilder("layer", program)
    x = fb.input("x", f32("B", "T", 32))
    offset = fb.input("offset", TensorType(DType.I32, ()))
    w = fb.param("w.weight", f32(48, 32))
    norm = fb.param("norm.weight", f32(32))
    wq = fb.derive("quantize", w, name="w_q.weight", bits=4, group_size=32)
    n = fb.op("rms_norm", x, norm, name="n", eps=1e-6)
    h = fb.op("linear", n, wq, name="h")
    a, b = fb.op("split", h, name=["a", "b"], sizes=[32, 16], axis=-1)
    q = fb.op("reshape", a, name="q", shape=["B", "T", 4, 8])
    qt = fb.op("transpose", q, name="qt", perm=[0, 2, 1, 3])
    scaling = RopeScaling(kind=RopeKind.LLAMA3, factor=8.0, original_max_position_embeddings=8192)
    r = fb.op("rope", qt, offset, name="r", dims=8, base=500000.0, scaling=scaling, traditional=False)
    o = fb.op("attention", r, r, r, name="o", scale=0.125, window=None)
    ot = fb.op("transpose", o, name="ot", perm=[0, 2, 1, 3])
    flat = fb.op("reshape", ot, name="flat", shape=["B", "T", 32])
    y = fb.op("add", x, flat, name="y")
    fb.build(y, b)
    fb = FunctionBuilder("main", program)
    ids = fb.input("ids", TensorType(DType.I32, ("B", "T")))
    offset = fb.input("offset", TensorType(DType.I32, ()))
    table = fb.param("embed.weight", f32(100, 32))
    e = fb.op("embed", ids, table, name="e")
    y, _ = fb.op("call", e, offset, name=["y", "side"], callee="layer", prefix="layers.0")
    g = fb.op("gelu_tanh", y, name="g")
    z = fb.op("cast", g, name="z", dtype=DType.BF16)
    fb.build(fb.op("cast", z, name="back", dtype=DType.F32))
    return program


def test_builder_program_prints_the_hand_written_text():
    program = verify(_built())
    assert print_program(program) == EXPECTED_BUILT
    # the inferred types are the ones written by hand, e.g. the quantized weight's
    assert program["layer"].derived[0].results[0].type == TensorType(DType.F32, (48, 32), Quant(4, 32))


def test_parsed_structure_is_what_the_text_says():
    """Parsing, checked without the printer: ops, operand identity (SSA uses point at their definitions), typed
    attribute values and the declared types."""
    program = verify(parse_program(EXPECTED_BUILT))
    layer, main = program["layer"], program["main"]
    assert [o.op for o in layer.derived] == ["quantize"]
    assert [o.op for o in layer.ops] == ["rms_norm", "linear", "split", "reshape", "transpose", "rope", "attention",
                                         "transpose", "reshape", "add"]
    x, offset, w, norm = layer.inputs[0], layer.inputs[1], layer.params[0], layer.params[1]
    quantize, (rms, linear, split, *_, add) = layer.derived[0], layer.ops
    assert quantize.operands == [w] and quantize.attrs == {"bits": 4, "group_size": 32}
    assert rms.operands[0] is x and rms.operands[1] is norm and rms.attrs["eps"] == 1e-6
    assert linear.operands[1] is quantize.results[0]
    assert list(split.attrs["sizes"]) == [32, 16] and split.attrs["axis"] == -1  # the default, not printed
    assert [r.name for r in split.results] == ["a", "b"] and layer.outputs[1] is split.results[1]
    assert add.operands[0] is x and layer.outputs[0] is add.results[0]
    rope = layer.ops[5]
    assert rope.operands[1] is offset and layer.declared_states == program.states(layer) == (State(StateKind.KV),)
    assert rope.attrs["scaling"] == RopeScaling(kind=RopeKind.LLAMA3, factor=8.0, original_max_position_embeddings=8192)
    assert rope.attrs["traditional"] is False and layer.ops[6].attrs["window"] is None
    assert main.inputs[0].type == TensorType(DType.I32, ("B", "T"))
    call = main.ops[1]
    assert call.attrs["callee"] == "layer" and call.attrs["prefix"] == "layers.0"
    assert [r.type for r in call.results] == [TensorType(DType.F32, ("B", "T", 32)), TensorType(DType.F32, ("B", "T", 16))]
    assert main.ops[3].attrs["dtype"] == DType.BF16 and main.ops[3].results[0].type.dtype == DType.BF16
    assert [n for n, _ in program.parameters()] == ["embed.weight", "layers.0.w.weight", "layers.0.norm.weight"]
    assert [n for n, _ in program.runtime_parameters()] == ["embed.weight", "layers.0.norm.weight",
                                                            "layers.0.w_q.weight"]


def test_json_is_the_documented_form():
    """The JSON export of a small program, compared with the document written by hand (attributes as typed JSON
    values, defaults included)."""
    text = ("func @main(%x: f32[B, 32]) -> (f32[B, 4], f32[B, 4]) {\n"
            "  param %w.weight: f32[8, 32]\n"
            "  derive %wq.weight = quantize(%w.weight) {bits = 8, group_size = 32} : f32[8, 32] q8g32\n"
            "  %y = linear(%x, %wq.weight) : f32[B, 8]\n"
            "  %a, %b = split(%y) {sizes = [4, 4]} : f32[B, 4], f32[B, 4]\n"
            "  return %a, %b\n"
            "}\n")
    doc = json.loads(to_json(verify(parse_program(text))))
    assert doc["format"] == "mlxc-ir"
    assert doc["functions"] == [{
        "name": "main",
        "inputs": [{"name": "x", "type": "f32[B, 32]"}],
        "params": [{"name": "w.weight", "type": "f32[8, 32]"}],
        "derived": [{"op": "quantize", "operands": ["w.weight"], "attrs": {"bits": 8, "group_size": 32},
                     "results": [{"name": "wq.weight", "type": "f32[8, 32] q8g32"}]}],
        "ops": [{"op": "linear", "operands": ["x", "wq.weight"], "attrs": {"kernel": "reference"},
                 "results": [{"name": "y", "type": "f32[B, 8]"}]},
                {"op": "split", "operands": ["y"], "attrs": {"sizes": [4, 4], "axis": -1},
                 "results": [{"name": "a", "type": "f32[B, 4]"}, {"name": "b", "type": "f32[B, 4]"}]}],
        "outputs": ["a", "b"],
        "state": [],
    }]


@pytest.mark.parametrize("text,message", [
    # each position counted by hand: line and column of the offending token, 1-based
    ("func @main(%x: f32[4]) -> f32[4] {\n  %y = relu(%x) : f32[4]\n  %y = relu(%x) : f32[4]\n  return %y\n}\n",
     "line 3, column 3: %y defined twice"),
    ("func @main(%x: f32[4]) -> f32[4] {\n  %y = relu(%z) : f32[4]\n  return %y\n}\n",
     "line 2, column 13: use of undefined value %z"),
    ("func @main(%x: f32[4]) -> f32[4] {\n  %y = relux(%x) : f32[4]\n  return %y\n}\n",
     "line 2, column 8: unknown op 'relux'"),
    ("func @main(%x: f32[4, -1]) -> f32[4] {\n  return %x\n}\n",
     "line 1, column 23: bad dimension '-1'"),
    ("func @main(%x: f32[4]) -> f32[4] {\n  %a, %b = relu(%x) : f32[4]\n  return %a\n}\n",
     "line 2, column 12: relu defines 2 values but lists 1 types"),
    ("func @main(%x: f32[4]) -> f32[4] {\n  %y = relu(%x) : f32[4]\n  return %y, %x\n}\n",
     "line 3, column 3: @main returns ['f32[4]', 'f32[4]'] but declares ['f32[4]']"),
    ("func @main(%x: f32[4]) -> f32[4] {\n  %y = rms_norm(%x, %x) {eps = #nope<a = 1>} : f32[4]\n  return %y\n}\n",
     "line 2, column 32: unknown attribute struct #nope"),
    ("func @main(%x: f32[4]) -> f32[4] {\n  %y = relu(%x) : f32[4]\n",
     "line 3, column 1: expected a value, found 'end of input'"),
    ("func @main(%x: f32[4]) -> f32[4] {\n\treturn %x;\n}\n",
     "line 2, column 11: unexpected character ';'"),
])
def test_parse_error_positions(text, message):
    with pytest.raises(ParseError) as info:
        parse_program(text)
    assert str(info.value) == message
