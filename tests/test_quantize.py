"""Quantized weights as IR types: the quantize pass, quantized codegen, weight binding, artifacts, kernel selection.

The reference is MLX's own quantize/dequantize: a quantized model must compute exactly what the float model computes
with each weight replaced by `dequantize(quantize(w))`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlxc
from mlxc.ir import DType, Quant, TensorType, parse_program, verify
from mlxc.ir.errors import MlxcError, VerifyError
from mlxc.passes import Quantize, SelectKernels, StorageTypes, build_pipeline, run_pipeline

SPEC = mlxc.ModelSpec(
    name="q", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
)
IDS = mx.array(np.random.default_rng(0).integers(0, 128, size=(2, 12)))


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
        w.type = TensorType(DType.F32, (64, 64), Quant(4, 48))
        verify(program)


def _reference_logits(bits: int, group: int) -> np.ndarray:
    """The float model with every quantizable weight replaced by dequantize(quantize(w))."""
    model = mlxc.load(SPEC, passes=["dce"], seed=3, init_scale=0.1)
    from mlx.utils import tree_flatten

    weights = []
    for name, w in tree_flatten(model.net.parameters()):
        if w.ndim == 2 and (name.endswith("proj.weight") or name in ("embed_tokens.weight", "lm_head.weight")):
            w = mx.dequantize(*mx.quantize(w, group_size=group, bits=bits), group_size=group, bits=bits)
        weights.append((name, w))
    model.net.load_weights(weights)
    return np.array(model(IDS).logits)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
def test_quantized_model_equals_dequantized_reference(bits, group):
    q = mlxc.load(SPEC, passes=["dce", Quantize(bits=bits, group_size=group)], seed=3, init_scale=0.1)
    src = open(q.module_path).read()
    assert "mx.quantized_matmul(" in src and "mx.dequantize(" in src  # lm head matmul and embedding lookup
    assert q.net.layers[0].attn.q_proj_q.weight.dtype == mx.uint32
    np.testing.assert_allclose(np.array(q(IDS).logits), _reference_logits(bits, group), atol=2e-4, rtol=0)


def test_select_kernels_dequantizes_on_cpu_only():
    stored = {name: Quant(4, 32) for name, p in mlxc.lower(SPEC).parameters() if name.endswith("proj.weight")}
    for target, expect_quantized in (("cpu", False), ("gpu", True)):
        program = run_pipeline(mlxc.lower(SPEC), [StorageTypes(quant=stored), "fuse-qkv", "lift-params",
                                                  SelectKernels(target=target)])
        assert "f32[128, 64] q4g32" in str(program)  # the fused QKV weight concatenates quantized rows
        assert (len(_quantized_params(program)) > 0) == expect_quantized
        if not expect_quantized:
            assert "dequantize(%qkv_proj.weight)" in str(program)


def test_user_quantize_takes_the_place_of_kernel_selection():
    """Asking for quantization is the kernel choice: `quantize` replaces `select-kernels`, after fusion."""
    names = [getattr(p, "name", p) for p in build_pipeline(quantize=4, group_size=32)]
    assert "select-kernels" not in names and names.index("fuse-qkv") < names.index("quantize")


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
