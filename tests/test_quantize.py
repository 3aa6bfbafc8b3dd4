"""Quantized weights as IR types: the quantize pass, quantized codegen, weight binding, artifacts, kernel selection.

The reference is independent of MLX's quantizer: `tests/affine_ref.py` is MLX's affine group quantization written in
numpy (checked here to reproduce `mx.quantize` bit for bit), and GGUF blocks are checked against the `gguf`
package's own dequantizer. A quantized model must store exactly the reference's codes, scales and biases and compute
what the float model computes with each weight replaced by the reference's dequantized weight.
"""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxc
from mlxc.ir import DType, Quant, TensorType, parse_program, verify
from mlxc.ir.errors import MlxcError, VerifyError
from mlxc.passes import Quantize, SelectKernels, StorageTypes, build_pipeline, run_pipeline
from mlxc.runtime import weights as W


import affine_ref as ref  # noqa: E402  (tests/ is on sys.path: conftest.py)


SPEC = mlxc.ModelSpec(
    name="q", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
)
IDS = mx.array(np.random.default_rng(0).integers(0, 128, size=(2, 12)))
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype != mx.uint32 else np.array(a)


# ------------------------------------------------------------------------------------------ the numpy reference


@pytest.mark.parametrize("dtype", sorted(MX_DTYPES))
@pytest.mark.parametrize("bits", Quant.BITS)
def test_numpy_reference_reproduces_mx_quantize(bits, dtype):
    """The reference is only worth trusting if it is MLX's format exactly: codes, scales and biases bit for bit, for
    every width and group size, on data with the awkward cases (constant groups, all-positive and all-negative
    groups, widely varying row scales)."""
    rng = np.random.default_rng(bits)
    for group in (32, 64, 128):
        w = rng.standard_normal((12, 256)).astype(np.float32) * rng.uniform(0.01, 4.0, (12, 1)).astype(np.float32)
        w[0, :group] = 0.0
        w[1, :group] = 0.75
        w[2, :group] = np.abs(w[2, :group])
        w[3, :group] = -np.abs(w[3, :group])
        wm = mx.array(w).astype(MX_DTYPES[dtype])
        w = _f32(wm)  # the values MLX actually quantizes
        codes, scales, biases = mx.quantize(wm, group_size=group, bits=bits)
        rcodes, rscales, rbiases = ref.affine_quantize(w, group, bits, dtype)
        assert codes.dtype == mx.uint32 and codes.shape == (12, 256 * bits // 32)
        np.testing.assert_array_equal(np.array(codes), rcodes, err_msg=f"codes, group {group}")
        np.testing.assert_array_equal(_f32(scales), rscales, err_msg=f"scales, group {group}")
        np.testing.assert_array_equal(_f32(biases), rbiases, err_msg=f"biases, group {group}")
        deq = mx.dequantize(codes, scales, biases, group_size=group, bits=bits)
        np.testing.assert_array_equal(_f32(deq), ref.affine_dequantize(rcodes, rscales, rbiases, group, bits, dtype))
        if dtype != "float32":
            continue  # (half-precision scales are rounded after the codes are chosen, so the bound below is looser)
        # and what the format is for: every weight within one step (the scale) of its value; not half a step, since
        # the scale is nudged to make one edge exact and the other edge's code may then be clipped
        err = np.abs(ref.affine_dequantize(rcodes, rscales, rbiases, group, bits) - w).reshape(12, -1, group)
        assert (err <= np.abs(rscales)[..., None] * (1 + 1e-3) + 1e-6).all()


def test_reference_packing_by_hand():
    """The packing, checked on codes whose words can be written down: 4-bit codes 0..7 in a row are the nibbles of
    0x76543210 (first code in the lowest bits), 8-bit codes the bytes of 0x03020100; 3-bit codes run across words."""
    np.testing.assert_array_equal(ref.pack_codes(np.arange(8)[None], 4), [[0x76543210]])
    np.testing.assert_array_equal(ref.pack_codes(np.arange(4)[None], 8), [[0x03020100]])
    three = np.array([[7] + [0] * 9 + [5] + [0] * 21])  # code 10 spans bits 30..32: 0b101 -> bit 30 and bit 32
    np.testing.assert_array_equal(ref.pack_codes(three, 3), [[0x7 | (1 << 30), 1, 0]])
    for bits in Quant.BITS:
        codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 64))
        np.testing.assert_array_equal(ref.unpack_codes(ref.pack_codes(codes, bits), bits), codes)


# ------------------------------------------------------------------------------------------ the IR and the passes


def _quantized_params(program):
    """Runtime parameters (what the generated module holds) that are quantized."""
    return {name: p.type.quant for name, p in program.runtime_parameters() if p.type.quant is not None}


def test_quantize_pass_types_and_text_round_trip():
    program = run_pipeline(mlxc.lower(SPEC), ["dce", Quantize(bits=4, group_size=32)])
    quant = _quantized_params(program)
    # every matmul weight and the embedding table, quantized by load-time ops; norms stay float
    assert "layers.0.attn.q_proj_q.weight" in quant and "embed_tokens_q.weight" in quant
    assert not any("norm" in n for n in quant)
    assert set(quant.values()) == {Quant(4, 32)}
    text = str(program)
    assert "derive %q_proj_q.weight = quantize(%q_proj.weight) {bits = 4, group_size = 32} : f32[64, 64] q4g32" in text
    assert str(verify(parse_program(text))) == text


def test_quantized_operand_rejected_by_other_ops():
    program = mlxc.lower(SPEC)
    norm = program.main.param("norm.weight")
    norm.type = norm.type.with_quant(Quant(4, 32))
    with pytest.raises(VerifyError, match="cannot take the quantized operand"):
        verify(program)


def test_group_size_must_divide_rows():
    with pytest.raises(VerifyError, match="group size"):
        program = mlxc.lower(SPEC)
        w = program["attention"].param("q_proj.weight")
        w.type = TensorType(DType.F32, (64, 64), Quant(4, 128))  # a supported group size wider than the rows
        verify(program)


def test_group_size_must_be_one_mlx_supports():
    text = ("func @main(%x: f32[B, 16]) -> f32[B, 8] {\n"
            "  param %w.weight: f32[8, 16]\n"
            "  derive %wq.weight = quantize(%w.weight) {bits = 4, group_size = 16} : f32[8, 16] q4g16\n"
            "  %y = linear(%x, %wq.weight) : f32[B, 8]\n"
            "  return %y\n"
            "}\n")
    with pytest.raises(VerifyError, match="group size"):
        verify(parse_program(text))


def _float_weights() -> dict[str, np.ndarray]:
    """The float model's weights (seed 3), by generated-module name."""
    model = mlxc.load(SPEC, passes=["dce"], seed=3, init_scale=0.1)
    return {name: np.array(w) for name, w in tree_flatten(model.net.parameters())}


def _is_quantizable(name: str, w: np.ndarray) -> bool:
    return w.ndim == 2 and (name.endswith("proj.weight") or name in ("embed_tokens.weight", "lm_head.weight"))


def _reference_logits(bits: int, group: int) -> np.ndarray:
    """The float model with every matmul/embedding weight replaced by the numpy reference's
    dequantize(quantize(w))."""
    model = mlxc.load(SPEC, passes=["dce"], seed=3, init_scale=0.1)
    weights = []
    for name, w in tree_flatten(model.net.parameters()):
        if _is_quantizable(name, np.array(w)):
            w = mx.array(ref.affine_dequantize(*ref.affine_quantize(np.array(w), group, bits), group, bits))
        weights.append((name, w))
    model.net.load_weights(weights)
    return np.array(model(IDS).logits)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (3, 32), (6, 64)])
def test_quantized_model_stores_the_reference_codes(bits, group):
    """Every matmul weight and the embedding table is stored as exactly the reference's codes, scales and biases of
    the float weight. Fails if the quantize op quantizes along the wrong axis, with another group size or width, or
    casts the scales."""
    q = mlxc.load(SPEC, passes=["dce", Quantize(bits=bits, group_size=group)], seed=3, init_scale=0.1)
    floats = _float_weights()
    held = dict(tree_flatten(q.net.parameters()))
    expected = {n for n, w in floats.items() if _is_quantizable(n, w)}
    assert len(expected) == 2 + 7 * SPEC.num_layers
    for name in expected:
        base = name[: -len(".weight")] + "_q"
        rcodes, rscales, rbiases = ref.affine_quantize(floats[name], group, bits)
        assert held[base + ".weight"].dtype == mx.uint32, name
        np.testing.assert_array_equal(np.array(held[base + ".weight"]), rcodes, err_msg=name)
        np.testing.assert_array_equal(np.array(held[base + ".scales"]), rscales, err_msg=name)
        np.testing.assert_array_equal(np.array(held[base + ".biases"]), rbiases, err_msg=name)
    # norms are not quantized
    np.testing.assert_array_equal(np.array(held["norm.weight"]), floats["norm.weight"])


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
def test_quantized_model_equals_dequantized_reference(bits, group):
    q = mlxc.load(SPEC, passes=["dce", Quantize(bits=bits, group_size=group)], seed=3, init_scale=0.1)
    src = open(q.module_path).read()
    assert "mx.quantized_matmul(" in src and "mx.dequantize(" in src  # lm head matmul and embedding lookup
    assert q.net.layers[0].attn.q_proj_q.weight.dtype == mx.uint32
    ours, want = np.array(q(IDS).logits), _reference_logits(bits, group)
    np.testing.assert_allclose(ours, want, atol=2e-4, rtol=0)
    # the check has teeth: quantization changed the logits by far more than the tolerance
    assert np.abs(want - np.array(mlxc.load(SPEC, passes=["dce"], seed=3, init_scale=0.1)(IDS).logits)).max() > 1e-3


def test_select_kernels_dequantizes_on_cpu_only():
    stored = {name: Quant(4, 32) for name, p in mlxc.lower(SPEC).parameters() if name.endswith("proj.weight")}
    for target, expect_quantized in (("cpu", False), ("gpu", True)):
        program = run_pipeline(mlxc.lower(SPEC), [StorageTypes(quant=stored), "fuse-qkv", "lift-params",
                                                  SelectKernels(target=target)])
        assert "f32[128, 64] q4g32" in str(program)  # the fused QKV weight concatenates quantized rows
        assert (len(_quantized_params(program)) > 0) == expect_quantized
        if not expect_quantized:
            assert "dequantize(%qkv_proj.weight)" in str(program)


def test_user_quantize_comes_before_kernel_selection():
    """Asking for quantization: `quantize` runs after fusion and before `select-kernels`, which then keeps quantized
    weights quantized (MLX's quantized matmul, or the native kernels) instead of dequantizing them on the CPU."""
    items = build_pipeline(quantize=4, group_size=32)
    names = [p.name for p in items]
    assert names.index("fuse-qkv") < names.index("quantize") < names.index("select-kernels")
    assert next(p for p in items if p.name == "select-kernels").keep_quantized


def test_quantize_keeps_checkpoint_quantized_weights_as_stored():
    """A weight the checkpoint stores quantized is not dequantized and quantized again on the way."""
    stored = {name: Quant(4, 32) for name, p in mlxc.lower(SPEC).parameters() if name.endswith("proj.weight")}
    program = run_pipeline(mlxc.lower(SPEC), [StorageTypes(quant=stored)] + build_pipeline(quantize=8, group_size=32))
    text = str(program)
    assert "dequantize" not in text and "quantize(%qkv_proj.weight)" not in text
    assert "f32[128, 64] q4g32" in text  # the fused QKV weight, as stored
    assert "q8g32" in text  # the float embedding table was quantized as asked


def test_fused_quantized_checkpoint_weights_match_unfused():
    """Storage-typed (quantized) checkpoint weights, fused at load by concatenating quantized rows, compute exactly
    what the unfused quantized program computes."""
    stored = {name: Quant(4, 32) for name, p in mlxc.lower(SPEC).parameters() if name.endswith("proj.weight")}
    kw = dict(seed=4, init_scale=0.1)
    unfused = mlxc.load(SPEC, passes=[StorageTypes(quant=stored), "dce"], **kw)
    fused = mlxc.load(SPEC, passes=[StorageTypes(quant=stored), "fuse-qkv", "fuse-gate-up", "lift-params"], **kw)
    assert "qkv_proj.weight" in str(fused.program)
    np.testing.assert_allclose(np.array(fused(IDS).logits), np.array(unfused(IDS).logits), atol=1e-5, rtol=0)


def test_quantized_artifact_round_trip(tmp_path):
    out = mlxc.compile(SPEC, tmp_path / "art", quantize=4, group_size=32, seed=5)
    stored = mx.load(str(out / "weights.safetensors"))
    assert stored["layers.0.mlp.gate_up_proj_q.weight"].dtype == mx.uint32
    assert "layers.0.mlp.gate_up_proj_q.scales" in stored and "layers.0.mlp.gate_up_proj_q.biases" in stored
    direct = mlxc.load(SPEC, quantize=4, group_size=32, seed=5)
    loaded = mlxc.load(out)
    np.testing.assert_array_equal(np.array(loaded(IDS).logits), np.array(direct(IDS).logits))
    assert "q4g32" in str(loaded.program)


def test_bad_quantization_request():
    with pytest.raises(MlxcError, match="bits"):
        build_pipeline(quantize=7, group_size=64)
    with pytest.raises(MlxcError, match="group size"):
        build_pipeline(quantize=4, group_size=48)


# ------------------------------------------------------------------------------------------ GGUF blocks


def test_gguf_blocks_fused_and_dequantized_match_the_gguf_package(tmp_path):
    """Q4_0, Q4_1 and Q8_0 tensors written by the `gguf` package, read into MLX's affine layout, fused by joining
    their quantized rows at load (Q4_0 and Q4_1 are both q4g32, so they join without dequantizing) and dequantized
    at load: the weights the model holds equal the gguf package's own dequantization, concatenated. Fails if a
    block's scale/min is read into the wrong field, if quantized rows are joined along the wrong axis, or if the
    dequantization rounds the fp16 scales' products differently from GGUF readers."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(7)
    path = tmp_path / "blocks.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    want = {}
    for name, qtype, rows in (("a", Q.Q4_0, 8), ("b", Q.Q4_1, 4), ("c", Q.Q8_0, 6)):
        x = rng.standard_normal((rows, 64)).astype(np.float32) * np.float32(0.1)
        blocks = quantize(x, qtype)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        want[name] = dequantize(blocks, qtype)
        assert np.abs(want[name] - x).max() > 0  # really lossy, so a float path would not pass by accident
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    stored = W.read_gguf_blocks(path, {"a": W.GGUF_NATIVE["Q4_0"], "b": W.GGUF_NATIVE["Q4_1"],
                                       "c": W.GGUF_NATIVE["Q8_0"]})
    program = verify(parse_program(
        "func @main(%x: f32[B, 64]) -> (f32[B, 12], f32[B, 6]) {\n"
        "  param %a: f32[8, 64] q4g32\n"
        "  param %b: f32[4, 64] q4g32\n"
        "  param %c: f32[6, 64] q8g32\n"
        "  derive %ab = concat(%a, %b) {axis = 0} : f32[12, 64] q4g32\n"
        "  derive %ab_f = dequantize(%ab) : f32[12, 64]\n"
        "  derive %c_f = dequantize(%c) : f32[6, 64]\n"
        "  %y = linear(%x, %ab_f) : f32[B, 12]\n"
        "  %z = linear(%x, %c_f) : f32[B, 6]\n"
        "  return %y, %z\n"
        "}\n"
    ))
    held = dict(W.bind(program, stored))
    assert set(held) == {"ab_f", "c_f"}
    np.testing.assert_array_equal(np.array(held["ab_f"]), np.concatenate([want["a"], want["b"]]))
    np.testing.assert_array_equal(np.array(held["c_f"]), want["c"])
    # kept quantized (no dequantize), the fused weight is the joined blocks: the same numbers through MLX's kernel
    quantized = verify(parse_program(
        "func @main(%x: f32[B, 64]) -> f32[B, 12] {\n"
        "  param %a: f32[8, 64] q4g32\n"
        "  param %b: f32[4, 64] q4g32\n"
        "  derive %ab.weight = concat(%a, %b) {axis = 0} : f32[12, 64] q4g32\n"
        "  %y = linear(%x, %ab.weight) : f32[B, 12]\n"
        "  return %y\n"
        "}\n"
    ))
    arrays = dict(W.bind(quantized, {k: stored[k] for k in ("a", "b")}))
    deq = ref.affine_dequantize(np.array(arrays["ab.weight"]), np.array(arrays["ab.scales"]),
                                np.array(arrays["ab.biases"]), 32, 4)
    np.testing.assert_array_equal(deq, np.concatenate([want["a"], want["b"]]))
