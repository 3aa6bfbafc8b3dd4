"""The verifier on graphs broken in Python (not text): each error names the function and, for op errors, the op."""

from __future__ import annotations

import pytest

from mlxc.ir import (
    DType,
    Function,
    FunctionBuilder,
    Operation,
    Program,
    RopeKind,
    RopeScaling,
    TensorType,
    Value,
    VerifyError,
    parse_program,
    print_program,
    verify,
)

F32 = DType.F32


def t(*shape, dtype=F32) -> TensorType:
    return TensorType(dtype, tuple(shape))


def v(name: str, *shape, dtype=F32) -> Value:
    return Value(name, t(*shape, dtype=dtype))


def program(*fns: Function) -> Program:
    return Program(list(fns))


def expect(prog: Program, *needles: str) -> str:
    with pytest.raises(VerifyError) as info:
        verify(prog)
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def layer_program() -> Program:
    """@main calls @layer twice with prefixes layers.0 and layers.1."""
    p = Program()
    b = FunctionBuilder("layer", p)
    x = b.input("x", t("B", "T", 8))
    w = b.param("proj.weight", t(8, 8))
    n = b.param("norm.weight", t(8))
    h = b.op("rms_norm", x, n, eps=1e-5, name="h")
    b.build(b.op("add", x, b.op("linear", h, w, name="y"), name="out"))
    m = FunctionBuilder("main", p)
    x = m.input("x", t("B", "T", 8))
    h0 = m.op("call", x, callee="layer", prefix="layers.0", name="h0")
    m.build(m.op("call", h0, callee="layer", prefix="layers.1", name="h1"))
    return verify(p)


# ------------------------------------------------------------------------------------------------ ops


def test_valid_program_passes_and_returns_itself():
    p = layer_program()
    assert verify(p) is p
    assert [n for n, _ in p.parameters()] == [
        "layers.0.proj.weight", "layers.0.norm.weight", "layers.1.proj.weight", "layers.1.norm.weight",
    ]  # fmt: skip


def test_wrong_result_type():
    x, w = v("x", "B", 8), v("w", 16, 8)
    y = v("y", "B", 8)
    fn = Function("main", [x], [w], [Operation("linear", [x, w], {}, [y])], [y])
    expect(program(fn), "@main", "linear(%x, %w)", "%y declared f32[B, 8]", "gives f32[B, 16]")


def test_wrong_result_dtype():
    x = v("x", 4)
    y = v("y", 4, dtype=DType.F16)
    fn = Function("main", [x], [], [Operation("silu", [x], {}, [y])], [y])
    expect(program(fn), "@main", "silu(%x)", "declared f16[4]")


def test_wrong_number_of_results():
    x = v("x", 4)
    a, b = v("a", 2), v("b", 2)
    fn = Function("main", [x], [], [Operation("split", [x], {"sizes": [2, 2]}, [a])], [a])
    expect(program(fn), "@main", "split(%x)", "produces 2 results, 1 declared")
    fn2 = Function("main", [x], [], [Operation("relu", [x], {}, [a, b])], [a])
    expect(program(fn2), "@main", "relu(%x)", "produces 1 results, 2 declared")


def test_unknown_op():
    x, y = v("x", 4), v("y", 4)
    fn = Function("main", [x], [], [Operation("softmax", [x], {}, [y])], [y])
    expect(program(fn), "@main", "softmax(%x)", "unknown op 'softmax'")


def test_missing_attribute():
    x, w, y = v("x", 2, 4), v("w", 4), v("y", 2, 4)
    fn = Function("main", [x], [w], [Operation("rms_norm", [x, w], {}, [y])], [y])
    expect(program(fn), "@main", "rms_norm(%x, %w)", "needs attribute 'eps'")


def test_unknown_attribute():
    x, w, y = v("x", 2, 4), v("w", 4), v("y", 2, 4)
    fn = Function("main", [x], [w], [Operation("rms_norm", [x, w], {"eps": 1e-5, "epsilon": 1.0}, [y])], [y])
    expect(program(fn), "@main", "rms_norm(%x, %w)", "no attribute 'epsilon'")


def test_attribute_of_the_wrong_kind():
    x, y = v("x", 2, 4), v("y", 4, 2)
    fn = Function("main", [x], [], [Operation("transpose", [x], {"perm": "1, 0"}, [y])], [y])
    expect(program(fn), "@main", "transpose(%x)", "'perm' expects a list of ints")
    q, r = v("q", 1, 2, 3, 4), v("r", 1, 2, 3, 4)
    off = v("offset", dtype=DType.I32)
    fn = Function("main", [q, off], [], [Operation("rope", [q, off], {"dims": 4, "base": 1.0, "scaling": {"factor": 2}},
                                                   [r])], [r])
    expect(program(fn), "@main", "rope(%q, %offset)", "'scaling' expects RopeScaling")


def test_wrong_arity():
    x, y = v("x", 4), v("y", 4)
    fn = Function("main", [x], [], [Operation("add", [x], {}, [y])], [y])
    expect(program(fn), "@main", "add(%x)", "add takes 2 operands, got 1")


def test_concat_without_operands():
    x, y = v("x", 4), v("y", 4)
    fn = Function("main", [x], [], [Operation("concat", [], {"axis": 0}, [y])], [y])
    expect(program(fn), "@main", "concat()", "at least one operand")


@pytest.mark.parametrize("op", ["linear", "rms_norm", "layer_norm"])
def test_scalar_input_to_feature_ops(op):
    s, w, y = v("s"), v("w", 4, 4) if op == "linear" else v("w", 4), v("y", 4)
    attrs = {} if op == "linear" else {"eps": 1e-5}
    fn = Function("main", [s], [w], [Operation(op, [s, w], attrs, [y])], [y])
    expect(program(fn), "@main", f"{op}(%s, %w)", "feature axis")


def test_use_before_def():
    x = v("x", 4)
    a, b = v("a", 4), v("b", 4)
    fn = Function("main", [x], [], [Operation("relu", [b], {}, [a]), Operation("relu", [x], {}, [b])], [a])
    expect(program(fn), "@main", "relu(%b)", "operand %b is used before it is defined")


def test_value_from_another_function():
    other = v("x", 4)
    x, y = v("x", 4), v("y", 4)
    fn = Function("main", [x], [], [Operation("relu", [other], {}, [y])], [y])
    expect(program(fn), "@main", "relu(%x)", "used before it is defined")


def test_returns_undefined_and_returns_nothing():
    x, y = v("x", 4), v("y", 4)
    expect(program(Function("main", [x], [], [], [y])), "@main", "returns undefined value %y")
    expect(program(Function("main", [x], [], [], [])), "@main", "returns nothing")


def test_duplicate_value_names():
    x = v("x", 4)
    y1, y2 = v("y", 4), v("y", 4)
    ops = [Operation("relu", [x], {}, [y1]), Operation("silu", [x], {}, [y2])]
    expect(program(Function("main", [x], [], ops, [y2])), "@main", "%y is defined more than once")
    expect(program(Function("main", [x], [v("x", 4)], [], [x])), "@main", "%x is defined more than once")


def test_invalid_value_name():
    x, y = v("x", 4), v("my value", 4)
    fn = Function("main", [x], [], [Operation("relu", [x], {}, [y])], [y])
    expect(program(fn), "@main", "result has invalid name %my value")


def test_parameter_with_symbolic_shape():
    x, w, y = v("ids", "T", dtype=DType.I32), v("w", "V", 8), v("y", "T", 8)
    fn = Function("main", [x], [w], [Operation("embed", [x, w], {}, [y])], [y])
    expect(program(fn), "@main", "parameter %w must have a static shape, got f32[V, 8]")


def test_bad_reshape_and_negative_dims():
    x, y = v("x", "B", 64), v("y", "B", 4, 8)
    fn = Function("main", [x], [], [Operation("reshape", [x], {"shape": ["B", 4, 8]}, [y])], [y])
    expect(program(fn), "@main", "reshape(%x)", "cannot reshape f32[B, 64] to [B, 4, 8]")
    x, y = v("x", 4), v("y", -1, -4)
    fn = Function("main", [x], [], [Operation("reshape", [x], {"shape": [-1, -4]}, [y])], [y])
    expect(program(fn), "@main", "reshape(%x)", "negative dim")


def test_split_sizes():
    x, a, b = v("x", 4), v("a", -2), v("b", 6)
    fn = Function("main", [x], [], [Operation("split", [x], {"sizes": [-2, 6]}, [a, b])], [a])
    expect(program(fn), "@main", "split(%x)", "negative size")
    a, b = v("a", 2), v("b", 3)
    fn = Function("main", [x], [], [Operation("split", [x], {"sizes": [2, 3]}, [a, b])], [a])
    expect(program(fn), "@main", "split(%x)", "do not add up")


def test_linear_shape_and_dtype_mismatch():
    x, w, y = v("x", "T", 64), v("w", 128, 32), v("y", "T", 128)
    fn = Function("main", [x], [w], [Operation("linear", [x, w], {}, [y])], [y])
    expect(program(fn), "@main", "linear(%x, %w)", "input features 64 do not match weight f32[128, 32]")
    w16 = v("w", 128, 64, dtype=DType.F16)
    fn = Function("main", [x], [w16], [Operation("linear", [x, w16], {}, [y])], [y])
    expect(program(fn), "@main", "linear(%x, %w)", "dtype mismatch")


def test_attention_rules():
    q, k, o = v("q", 1, 3, "T", 8), v("k", 1, 2, "T", 8), v("o", 1, 3, "T", 8)
    fn = Function("main", [q, k], [], [Operation("attention", [q, k, k], {"scale": 0.5}, [o])], [o])
    expect(program(fn), "@main", "attention(%q, %k, %k)", "3 query heads are not a multiple of 2 kv heads")
    q = v("q", 1, 4, "T", 8)
    o = v("o", 1, 4, "T", 8)
    fn = Function("main", [q, k], [], [Operation("attention", [q, k, k], {"scale": 0.5, "window": -1}, [o])], [o])
    expect(program(fn), "@main", "attention(%q, %k, %k)", "window must be positive")


def test_rope_rules():
    x, y, off = v("x", 1, 2, "T", 8), v("y", 1, 2, "T", 8), v("offset", dtype=DType.I32)
    fn = Function("main", [x, off], [], [Operation("rope", [x, off], {"dims": 3, "base": 1e4}, [y])], [y])
    expect(program(fn), "@main", "rope(%x, %offset)", "rope dims 3 invalid for head_dim 8")
    x3, y3 = v("x", 2, "T", 8), v("y", 2, "T", 8)
    fn = Function("main", [x3, off], [], [Operation("rope", [x3, off], {"dims": 8, "base": 1e4}, [y3])], [y3])
    expect(program(fn), "@main", "rope(%x, %offset)", "rope expects [B, heads, T, head_dim]")
    positions = v("positions", "T", dtype=DType.I32)  # the offset is one scalar: where the call's tokens start
    fn = Function("main", [x, positions], [], [Operation("rope", [x, positions], {"dims": 8, "base": 1e4}, [y])], [y])
    expect(program(fn), "@main", "rope offset must be an integer scalar")


def test_declared_states_must_be_the_ops_states():
    """A signature's `state(...)` is checked against the states its ops keep (here one KV state, not two)."""
    text = ("func @main(%q: f32[1, 2, T, 8]) -> f32[1, 2, T, 8] state(kv, kv) {\n"
            "  %o = attention(%q, %q, %q) {scale = 0.5} : f32[1, 2, T, 8]\n"
            "  return %o\n}\n")
    with pytest.raises(VerifyError, match=r"declares state\(kv, kv\) but its ops keep state\(kv\)"):
        verify(parse_program(text))
    assert "state(kv(window=4)) {" in print_program(verify(parse_program(
        text.replace("state(kv, kv)", "state(kv(window=4))").replace("{scale = 0.5}", "{scale = 0.5, window = 4}"))))


# ------------------------------------------------------------------------------------------------ calls


def test_call_to_unknown_function():
    p = layer_program()
    p.main.ops[0].attrs["callee"] = "nope"
    expect(p, "@main", "call(%x)", "call to unknown function @nope")


def test_call_arity_and_argument_types():
    p = layer_program()
    extra = v("extra", "B", "T", 8)
    p.main.inputs.append(extra)
    p.main.ops[0].operands.append(extra)
    expect(p, "@main", "call(%x, %extra)", "@layer takes 1 inputs, got 2")
    p = layer_program()
    p.main.inputs[0].type = t("B", "T", 4)
    expect(p, "@main", "call(%x)", "input 0 of @layer is f32[B, T, 8], got f32[B, T, 4]")


def test_call_result_type_follows_the_callee():
    p = layer_program()
    p["layer"].outputs[0].type = t("B", "T", 8, dtype=DType.F16)
    expect(p, "@layer", "add(%x, %y)", "declared f16[B, T, 8]")


def test_self_call():
    p = layer_program()
    p["layer"].ops.append(Operation("call", [p["layer"].outputs[0]], {"callee": "layer"}, [v("again", "B", "T", 8)]))
    expect(p, "@layer", "call(%out)", "may not call itself")


def test_mutual_recursion():
    p = Program()
    for name, callee in [("a", "b"), ("b", "a")]:
        x, y = v("x", 4), v("y", 4)
        p.add(Function(name, [x], [], [Operation("call", [x], {"callee": callee, "prefix": ""}, [y])], [y]))
    x, y = v("x", 4), v("y", 4)
    p.add(Function("main", [x], [], [Operation("relu", [x], {}, [y])], [y]))
    # Not reachable from @main, still not allowed: later passes walk every function.
    expect(p, "recursive calls: @a -> @b -> @a")


def test_parameter_types_must_agree_across_calls():
    p = layer_program()
    p.main.params.append(v("layers.1.norm.weight", 16))
    expect(p, "@layer", "parameter layers.1.norm.weight has type f32[8], elsewhere f32[16]")


def test_missing_main_and_duplicate_functions():
    x = v("x", 4)
    expect(program(Function("layer", [x], [], [], [x])), "program has no @main function")
    m1, m2 = Function("main", [x], [], [], [x]), Function("main", [v("x", 4)], [], [], [v("x", 4)])
    expect(program(m1, m2), "function @main defined twice")
    with pytest.raises(VerifyError, match="defined twice"):
        Program([m1]).add(m2)


# ------------------------------------------------------------------------------------------------ builder


def test_builder_reports_function_and_op():
    b = FunctionBuilder("layer")
    x = b.input("x", t("T", 8))
    w = b.param("w", t(16, 4))
    with pytest.raises(VerifyError, match=r"^@layer: linear\(%x, %w\): input features 8"):
        b.op("linear", x, w)
    with pytest.raises(VerifyError, match="parameter %w declared twice"):
        b.param("w", t(4))
    with pytest.raises(VerifyError, match=r"@layer: call\(%x\): call to unknown function @other"):
        b.op("call", x, callee="other")


def test_builder_numeric_names_stay_valid():
    b = FunctionBuilder("main", Program())
    x = b.input("x", t(4))
    a = b.op("relu", x, name="0")
    c = b.op("relu", a, name="0")
    parts = b.op("split", c, sizes=[2, 2], name="0")
    b.build(*parts)
    names = [a.name, c.name] + [p.name for p in parts]
    assert len(set(names)) == len(names)
    text = print_program(verify(b.program))
    assert print_program(parse_program(text)) == text


def test_rope_scaling_fields_are_canonical():
    # Hugging Face configs give numbers as ints and the kind as a string; the struct stores canonical types.
    s = RopeScaling(kind="llama3", factor=8, low_freq_factor=1, original_max_position_embeddings=8192)
    assert s.kind is RopeKind.LLAMA3 and isinstance(s.factor, float) and isinstance(s.low_freq_factor, float)
    b = FunctionBuilder("main", Program())
    x = b.input("x", t(1, 2, "T", 8))
    off = b.input("offset", t(dtype=DType.I32))
    b.build(b.op("rope", x, off, dims=8, base=10000, scaling=s))
    text = print_program(verify(b.program))
    assert "#rope<kind = llama3, factor = 8.0, original_max_position_embeddings = 8192>" in text
    assert print_program(parse_program(text)) == text
    with pytest.raises(ValueError):
        RopeScaling(kind="ntk")
