"""GGUF K-quants (Q4_K, Q6_K) stay quantized: their blocks as affine groups (Q4_K: 4-bit codes per 32 weights,
Q6_K: 8-bit codes per 16, float32 scales), the native packed kernels on every ISA the CPU has, and whole models
against transformers, which dequantizes the same file with gguf-py (the independent reference throughout).

gguf-py cannot quantize K-quants, so the blocks are random bytes (every byte pattern is a valid code or sub-block
scale) with finite, moderate float16 super-block scales written over them.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import mlxc
from mlxc.ir.errors import MlxcError
from mlxc.kernels import native
from mlxc.runtime.slices import _affine_blocks
from mlxc.runtime.weights import GGUF_K
from parity import greedy_ids

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")
ISAS = native.supported_isas() if native.available() else []
SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def k_blocks(kind: str, n: int, k: int, rng, scale: float = 1.0) -> np.ndarray:
    """uint8 [n, k / 256, bytes]: random super-blocks with float16 d (and dmin) of about `scale` / 64 per unit."""
    raw = rng.integers(0, 256, (n, k // 256, SIZES[kind]), dtype=np.uint8)

    def f16(lo, hi):
        return np.float16(rng.uniform(lo, hi, (n, k // 256, 1)) * scale).view(np.uint8)

    if kind == "Q6_K":  # w = d * sc * (q - 32): |sc| < 128, |q - 32| <= 32
        raw[..., 208:210] = f16(2e-4, 4e-4)
    else:  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = f16(5e-4, 1e-3), f16(5e-4, 1e-3)
    return raw


def reference(raw: np.ndarray, kind: str) -> np.ndarray:
    """gguf-py's dequantization, float64 [n, k]."""
    return dequantize(raw.reshape(raw.shape[0], -1), Q[kind]).astype(np.float64)


# ------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_blocks_are_affine_groups_exactly(kind):
    rng = np.random.default_rng(1)
    raw = k_blocks(kind, 9, 768, rng)
    t = _affine_blocks(raw, kind, GGUF_K[kind])
    assert (t.quant.bits, t.quant.group_size) == ((4, 32) if kind == "Q4_K" else (8, 16))
    assert t.shape == (9, 768) and t.scales.dtype == mx.float32 and t.scales.shape == (9, 768 // t.quant.group_size)
    # the same float32 numbers gguf-py computes (scales d*sc and -dmin*m are exact in float32)
    np.testing.assert_array_equal(np.array(t.dequantize()), reference(raw, kind).astype(np.float32))
    if kind == "Q6_K":
        codes = np.array(t.codes).view(np.uint8)
        assert codes.max() <= 63
        np.testing.assert_array_equal(np.array(t.biases), -32 * np.array(t.scales))


# ------------------------------------------------------------------------------------------------- kernels


@pytest.fixture(params=ISAS)
def isa(request):
    native.set_isa(request.param)
    yield request.param
    native.set_isa("auto")


def act_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One int8 activation pass's worst-case error: sum over 32-blocks of (max|x_block| / 254) * sum_block |W[n]|,
    plus float32 summation slack."""
    xb = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=2) / 254.0
    wb = np.abs(w).reshape(w.shape[0], -1, 32).sum(2)
    return xb @ wb.T + 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-6


@needs_native
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("m,n,k", [(1, 37, 256), (1, 64, 768), (5, 19, 512), (19, 37, 256), (8, 16, 1024)])
def test_packed_kernels_against_float64(isa, kind, m, n, k):
    """Decode (m = 1) and prompt (m > 1) shapes, partial 16-row tiles, one and two activation passes."""
    rng = np.random.default_rng(m * 1000 + n)
    raw = k_blocks(kind, n, k, rng)
    w = reference(raw, kind)
    t = _affine_blocks(raw, kind, GGUF_K[kind])
    q = t.quant
    pc, ps, pb = native.pack(t.codes, t.scales, t.biases, bits=q.bits, group_size=q.group_size)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, ::7] *= 4.0
    exact = x.astype(np.float64) @ w.T
    one = np.array(native.qmatmul_packed(mx.array(x), pc, ps, pb, bits=q.bits, group_size=q.group_size, n=n))
    err = np.abs(one - exact)
    assert (err <= act_bound(x.astype(np.float64), w)).all(), err.max()
    assert err.max() > 0  # the int8 path really ran (a float path would be exact to ~1e-6)
    two = np.array(native.qmatmul_packed(mx.array(x), pc, ps, pb, bits=q.bits, group_size=q.group_size, n=n,
                                         act_terms=2))
    assert np.sqrt(((two - exact) ** 2).mean()) <= np.sqrt((err ** 2).mean()) / 20


@needs_native
def test_every_isa_computes_what_the_scalar_kernel_computes():
    rng = np.random.default_rng(7)
    raw = k_blocks("Q6_K", 45, 512, rng)
    t = _affine_blocks(raw, "Q6_K", GGUF_K["Q6_K"])
    pc, ps, pb = native.pack(t.codes, t.scales, t.biases, bits=8, group_size=16)
    x = mx.array(rng.standard_normal((3, 512)).astype(np.float32))
    out = {}
    try:
        for name in ISAS:
            native.set_isa(name)
            out[name] = np.array(native.qmatmul_packed(x, pc, ps, pb, bits=8, group_size=16, n=45))
    finally:
        native.set_isa("auto")
    for name, y in out.items():  # the same integer dot products; float sums in another order
        np.testing.assert_allclose(y, out["scalar"], rtol=2e-5, atol=2e-5 * np.abs(out["scalar"]).max(), err_msg=name)


@needs_native
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_lookups_return_the_dequantized_rows(kind):
    rng = np.random.default_rng(3)
    raw = k_blocks(kind, 40, 512, rng)
    w = reference(raw, kind).astype(np.float32)
    t = _affine_blocks(raw, kind, GGUF_K[kind])
    q, ids = t.quant, mx.array([[0, 39, 17], [5, -1, 3]])
    rows = w[np.array(ids) % 40]
    got = native.qembed(ids, t.codes, t.scales, t.biases, bits=q.bits, group_size=q.group_size)
    np.testing.assert_array_equal(np.array(got), rows)
    pc, ps, pb = native.pack(t.codes, t.scales, t.biases, bits=q.bits, group_size=q.group_size)
    got = native.qembed_packed(ids, pc, ps, pb, bits=q.bits, group_size=q.group_size, n=40)
    np.testing.assert_array_equal(np.array(got), rows)
    back = native.unpack(pc, ps, pb, n=40, bits=q.bits, group_size=q.group_size)
    for a, b in zip(back, (t.codes, t.scales, t.biases)):
        np.testing.assert_array_equal(np.array(a), np.array(b))


@needs_native
def test_group_16_needs_8_bit_codes_and_the_packed_layout():
    rng = np.random.default_rng(0)
    t = _affine_blocks(k_blocks("Q6_K", 16, 256, rng), "Q6_K", GGUF_K["Q6_K"])
    x = mx.ones((1, 256))
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):  # the unpacked kernels: a scale per 32
        native.qmatmul(x, t.codes, t.scales, t.biases, bits=8, group_size=16)
    pc, ps, pb = native.pack(t.codes, t.scales, t.biases, bits=8, group_size=16)
    with pytest.raises(ValueError, match="needs 8-bit codes"):
        native.qmatmul_packed(x, pc, ps[:, :128], pb[:, :128], bits=4, group_size=16, n=16)
    with pytest.raises(ValueError, match="group_size"):
        native.pack(t.codes, t.scales, t.biases, bits=4, group_size=16)


# ------------------------------------------------------------------------------------------------- models

HIDDEN, HEADS, KV, INTER, VOCAB = 256, 4, 2, 512, 96


def write_llama(path, types: dict[str, str], tied: bool = False, nan_in: str | None = None, seed: int = 5):
    """A tiny two-layer Llama GGUF: `types` maps a tensor role (q, k, v, o, gate, up, down, embd, output) to its
    GGML type (K-quants written as random blocks, Q8_0/Q4_0 through gguf-py's quantizer, F32 as is)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 128), (w.add_embedding_length, HIDDEN),
                   (w.add_feed_forward_length, INTER), (w.add_head_count, HEADS), (w.add_head_count_kv, KV),
                   (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5)):
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(VOCAB - 3)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def tensor(name, role, shape, scale=1.0):
        kind = types[role]
        if kind in SIZES:
            raw = k_blocks(kind, shape[0], shape[1], rng, scale).reshape(shape[0], -1)
            if nan_in == name:
                raw[shape[0] // 2, 208 if kind == "Q6_K" else 0: (208 if kind == "Q6_K" else 0) + 2] = \
                    np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=Q[kind])
        else:
            x = (rng.standard_normal(shape) * 0.05 * scale).astype(np.float32)
            if kind == "F32":
                w.add_tensor(name, x)
            else:
                data = quantize(x, Q[kind])
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=Q[kind])

    tensor("token_embd.weight", "embd", (VOCAB, HIDDEN), scale=8.0)
    for b in range(2):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{b}.attn_q.weight", "q", (HIDDEN, HIDDEN))
        tensor(f"blk.{b}.attn_k.weight", "k", (KV * HIDDEN // HEADS, HIDDEN))
        tensor(f"blk.{b}.attn_v.weight", "v", (KV * HIDDEN // HEADS, HIDDEN))
        tensor(f"blk.{b}.attn_output.weight", "o", (HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{b}.ffn_gate.weight", "gate", (INTER, HIDDEN))
        tensor(f"blk.{b}.ffn_up.weight", "up", (INTER, HIDDEN))
        tensor(f"blk.{b}.ffn_down.weight", "down", (HIDDEN, INTER))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    if not tied:
        tensor("output.weight", "output", (VOCAB, HIDDEN), scale=4.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Q4_K_M's mix: Q4_K for most matrices, Q6_K for V, the FFN's down projection and the LM head, plus a Q8_0
Q4_K_M = {"q": "Q4_K", "k": "Q4_K", "v": "Q6_K", "o": "Q8_0", "gate": "Q4_K", "up": "Q4_K", "down": "Q6_K",
          "embd": "Q4_K", "output": "Q6_K"}


@pytest.fixture(scope="module", params=["untied", "tied"])
def kfile(request, tmp_path_factory):
    """The Q4_K_M mix (untied: Q4_K embedding, Q6_K head), and a tied Q6_K embedding read by lookups and the head."""
    tied = request.param == "tied"
    types = dict(Q4_K_M, embd="Q6_K") if tied else Q4_K_M
    return write_llama(tmp_path_factory.mktemp("kq") / f"{request.param}.gguf", types, tied=tied)


IDS = [1, 7, 33, 4, 90, 12, 5, 61, 20, 3, 44]


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.fixture(scope="module")
def hf_logits(kfile):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(kfile.parent), gguf_file=kfile.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([IDS])).logits[0].numpy()
        gen = model.generate(torch.tensor([IDS]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    return out, gen[0, len(IDS):].tolist()


def test_reference_path_equals_transformers(kfile, hf_logits):
    model = mlxc.load(kfile, kernels="reference")
    program = str(model.program)
    assert "q4g32" in program and "q8g16" in program  # parameters typed as stored ...
    assert "dequantize(" in program  # ... and dequantized at load on the CPU's reference path
    ours = np.array(model(mx.array([IDS])).logits[0])
    assert rel_rms(ours, hf_logits[0]) <= 1e-5
    assert greedy_ids(model, IDS, 8) == hf_logits[1]


@needs_native
def test_native_path_keeps_k_quants_and_agrees_with_transformers(kfile, hf_logits):
    model = mlxc.load(kfile)
    program = str(model.program)
    assert "dequantize" not in program
    assert "q4g32_packed" in program and "q8g16_packed" in program  # float32 scales: the model's own dtype
    assert "{kernel = native}" in program
    ours = np.array(model(mx.array([IDS])).logits[0])
    assert rel_rms(ours, hf_logits[0]) <= 2e-3  # two int8 activation passes per matmul (test_native_path.py)
    assert greedy_ids(model, IDS, 8) == hf_logits[1]
    # no float copy of any matrix: everything 2-D is codes, scales or biases
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.net.parameters()))
    floats = [n for n, a in params.items() if a.ndim == 2 and a.dtype == mx.float32 and not n.endswith(
        (".scales", ".biases"))]
    assert not floats, floats


@needs_native
def test_without_the_extension_the_module_falls_back_to_mlx(kfile):
    """The generated helpers' fallback (no extension where the module runs): packed weights unpacked, groups of 16
    dequantized with plain MLX ops; the reference path's numbers up to float rounding."""
    model = mlxc.load(kfile)
    ref = np.array(mlxc.load(kfile, kernels="reference")(mx.array([IDS])).logits)
    model.module.NATIVE = False
    try:
        got = np.array(model(mx.array([IDS])).logits)
    finally:
        model.module.NATIVE = True
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_ir_text_round_trips(kfile):
    from mlxc.ir.parser import parse_program

    for kernels in ("auto", "reference"):
        text = str(mlxc.api.program_for(kfile, kernels=kernels))
        assert str(parse_program(text)) == text


def test_artifact_keeps_the_blocks(kfile, tmp_path):
    out = mlxc.compile(kfile, tmp_path / "art")
    stored = mx.load(str(out / "weights.safetensors"))
    assert any(a.dtype == mx.uint32 for a in stored.values())  # quantized matrices stored as codes
    assert all(a.dtype != mx.uint8 for a in stored.values())  # in MLX's layout: packed at load
    k_scales = [a for n, a in stored.items() if n.endswith(".scales") and a.dtype == mx.float32]
    assert any(a.shape[-1] * 16 == HIDDEN for a in k_scales)  # a Q6_K matrix's groups of 16, float32 scales
    assert any(a.shape[-1] * 32 == HIDDEN for a in k_scales)  # and a Q4_K one's groups of 32
    np.testing.assert_array_equal(np.array(mlxc.load(out)(mx.array([IDS])).logits),
                                  np.array(mlxc.load(kfile)(mx.array([IDS])).logits))


def test_inspect_shows_the_quantization(kfile, capsys):
    from mlxc.cli import main

    assert main(["inspect", str(kfile)]) == 0
    out = capsys.readouterr().out
    assert "Q4_K" in out and "Q6_K" in out


# ------------------------------------------------------------------------------------------------- bad input


def test_nan_scale_stays_quantized_and_gives_nan_where_gguf_does(tmp_path):
    """A super-block with a NaN d stays quantized, like any Q4_0 block with one (deciding otherwise would mean
    reading every super-block's scale before compiling): its values are NaN exactly where gguf's dequantizer puts
    them, and the other rows are untouched."""
    from mlxc.frontends.gguf import read_gguf
    from mlxc.runtime.weights import gguf_native_types, read_gguf_blocks

    name = "blk.1.ffn_down.weight"
    path = write_llama(tmp_path / "nan.gguf", Q4_K_M, nan_in=name)
    ckpt = read_gguf(path)
    kept = gguf_native_types(ckpt)
    assert name in kept
    got = np.array(read_gguf_blocks(path, {name: kept[name]}, ckpt)[name].dequantize())
    want = dequantize(np.asarray(ckpt.raw(name)), Q[ckpt.tensor_infos[name].ggml_type])
    assert np.isnan(want).any() and not np.isnan(want).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["Q5_K"])
def test_other_k_quants_are_dequantized_as_before(tmp_path, kind):
    path = write_llama(tmp_path / "q5k.gguf", dict(Q4_K_M, gate=kind, up=kind))
    from mlxc.frontends.gguf import read_gguf
    from mlxc.runtime.weights import gguf_native_types

    ckpt = read_gguf(path)
    kept = gguf_native_types(ckpt)
    assert "blk.0.ffn_gate.weight" not in kept and "blk.0.ffn_down.weight" in kept
    model = mlxc.load(path, kernels="reference")
    assert np.isfinite(np.array(model(mx.array([IDS])).logits)).all()


def test_group_16_choices_and_types():
    """Without packing (pack=False: gradients through x) the native matmul kernels cannot read groups of 16, so such
    a weight is dequantized at load; lookups read it either way. The verifier takes group 16 only with 8 bits."""
    from mlxc.ir import DType, Operation, Quant, TensorType, Value
    from mlxc.ir.opdef import TypeRuleError
    from mlxc.ir.ops import _check_groups
    from mlxc.passes.select_kernels import SelectKernels

    w = Value("w", TensorType(DType.F32, (64, 256), Quant(8, 16)))
    lin = Operation("linear", [Value("x", TensorType(DType.F32, (1, 256))), w], {}, [])
    emb = Operation("embed", [Value("i", TensorType(DType.I32, (1,))), w], {}, [])
    assert SelectKernels._native_fits(lin, w, pack=True) and not SelectKernels._native_fits(lin, w, pack=False)
    assert SelectKernels._native_fits(emb, w, pack=False)
    _check_groups(w.type)
    with pytest.raises(TypeRuleError, match="group size 16"):
        _check_groups(TensorType(DType.F32, (64, 256), Quant(4, 16)))
    from mlxc.ir.ops import _moe  # experts run MLX's quantized matmul, which computes groups of 16 wrongly

    expert = TensorType(DType.F32, (2, 32, 32), Quant(8, 16))
    x, router = TensorType(DType.F32, (1, 3, 32)), TensorType(DType.F32, (1, 3, 2))
    with pytest.raises(TypeRuleError, match="no groups of 16"):
        _moe(x, router, expert, expert, expert, top_k=1, normalize=False, activation="silu", weights_in_float32=False,
             first_expert=None)


def test_slices_read_k_blocks_by_rows_and_whole_super_blocks(kfile):
    """Tensor-parallel loading (runtime/slices.py): a rank's rows or columns of a K-quant tensor, kept quantized and
    exact; columns may cut a 256-weight super-block between its affine groups (a 1536-wide projection over 4 ranks
    is 384 columns each), not inside a group."""
    from mlxc.frontends.gguf import read_gguf
    from mlxc.runtime.slices import GGUFSlices
    from mlxc.runtime.weights import QuantizedTensor, gguf_native_types

    ckpt = read_gguf(kfile)
    kept = gguf_native_types(ckpt)
    infos = ckpt.tensor_infos
    slices = GGUFSlices(kfile, {n: (i.ggml_type, tuple(i.shape), i.offset) for n, i in infos.items()}, kept)
    for name in ("blk.0.ffn_down.weight", "blk.0.ffn_gate.weight"):
        kind = infos[name].ggml_type
        full = dequantize(np.asarray(ckpt.raw(name)), Q[kind])
        rows = slices.read(name, 0, 16, 48)
        k = full.shape[1]
        cols = slices.read(name, 1, k - 256, k)
        assert isinstance(rows, QuantizedTensor) and rows.quant == kept[name]
        np.testing.assert_array_equal(np.array(rows.dequantize()), full[16:48])
        np.testing.assert_array_equal(np.array(cols.dequantize()), full[:, k - 256:])
        for a, b in ((0, 128), (96, k - 96)):  # cuts inside super-blocks, at group boundaries
            part = slices.read(name, 1, a, b)
            assert isinstance(part, QuantizedTensor) and part.quant == kept[name]
            np.testing.assert_array_equal(np.array(part.dequantize()), full[:, a:b])
        with pytest.raises(MlxcError, match="split a group"):
            slices.read(name, 1, 0, 40)
