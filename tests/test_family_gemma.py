"""Gemma 1, 2 and 3 (text) against transformers on random-weight checkpoints built with `save_pretrained`.

Each family gets a small checkpoint with what makes it Gemma: (1 + w) norms with weights away from zero, the
tanh-GELU GeGLU, scaled and tied embeddings; Gemma 2 with alternating windows shorter than the test sequence, a
`query_pre_attn_scalar` that is not head_dim and soft-caps small enough to bite; Gemma 3 with mixed layer types,
different rope bases per layer type and linear rope scaling on the global layers only. The harness is tests/parity.py.
GGUF files are written here the way llama.cpp's converter writes Gemma checkpoints (its tensor names from the `gguf`
package, norm weights stored as 1 + w) and must give the logits of the checkpoint they were written from.
"""

from __future__ import annotations

import json
import shutil
from math import prod
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import affine_ref as ref  # noqa: E402  (tests/ is on sys.path: conftest.py)
import mlxc  # noqa: E402
from mlxc.frontends.hf import hf_config_from_spec, hf_to_ir_name, load_hf_spec  # noqa: E402
from mlxc.frontends.presets import PRESETS as ALL_PRESETS, preset_for_hub_id  # noqa: E402
from mlxc.frontends.spec import Activation, AttentionType, Residual  # noqa: E402
from mlxc.ir.attrs import RopeKind  # noqa: E402
from mlxc.ir.errors import MlxcError  # noqa: E402
from parity import (SEQ, TOL, check_artifact, check_fusion, check_greedy, check_logits, check_lora,  # noqa: E402
                    check_stepwise, hf_logits, ids, max_diff, save_checkpoint)

VOCAB = 320
WINDOW = 7  # < SEQ (20): sliding layers see fewer keys than the sequence has
SLIDE, FULL = "sliding_attention", "full_attention"
MEASURED: dict[str, float] = {}  # max |logits - transformers| per case, printed at the end (-s)


def _base(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1,
                pad_token_id=0)
    return {**base, **overrides}


def _gemma(attention_bias=True):
    # attention biases: in transformers' class, though no published Gemma has them (nor llama.cpp's graph)
    return transformers.GemmaForCausalLM, transformers.GemmaConfig(**_base(
        num_hidden_layers=2, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh", attention_bias=attention_bias))


def _gemma2(query_pre_attn_scalar=24):
    return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**_base(
        num_hidden_layers=3, query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=WINDOW,
        attn_logit_softcapping=1.5, final_logit_softcapping=2.5))


def _gemma3(**overrides):
    fields = dict(num_hidden_layers=4, query_pre_attn_scalar=24, sliding_window=WINDOW,
                  layer_types=[SLIDE, FULL, SLIDE, SLIDE],
                  rope_parameters={SLIDE: {"rope_type": "default", "rope_theta": 100.0},
                                   FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}})
    return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(**_base(**{**fields, **overrides}))


CASES = {"gemma": _gemma, "gemma2": _gemma2, "gemma3": _gemma3}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Checkpoints made on first use: {name: (transformers model, directory)}."""
    made: dict[str, tuple[object, Path]] = {}
    root = tmp_path_factory.mktemp("gemma")

    def get(name: str, make=None):
        if name not in made:
            cls, config = (make or CASES[name])()
            made[name] = save_checkpoint(cls, config, root / name, seed=len(name)), root / name
        return made[name]

    yield get
    if MEASURED:
        print("\nmax |logits - transformers|: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(MEASURED.items())))


@pytest.fixture(params=sorted(CASES))
def case(request, built):
    hf, path = built(request.param)
    return request.param, hf, path


# ------------------------------------------------------------------------------------------------ numerics


def test_logits_match_transformers(case):
    name, hf, path = case
    model = mlxc.load(str(path))
    assert model.spec.family == name
    MEASURED[name] = check_logits(hf, model, VOCAB)


def test_greedy_through_the_cache_matches_generate(case):
    name, hf, path = case
    check_greedy(hf, mlxc.load(str(path)), VOCAB)


def test_chunked_prefill_then_decode_equals_full_prefill(case):
    """Two prefill chunks each longer than the window, then one token at a time past it."""
    _, _, path = case
    check_stepwise(mlxc.load(str(path)), VOCAB, chunks=(WINDOW + 1, WINDOW + 2))


def test_loss_matches_transformers(case):
    name, hf, path = case
    tokens = ids(VOCAB, (2, 16), seed=4)
    labels = tokens.copy()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), labels=torch.tensor(labels)).loss.item()
    ours = mlxc.load(str(path))(mx.array(tokens), labels=mx.array(labels)).loss.item()
    assert abs(ours - ref) <= TOL, name


def test_fusion_changes_nothing(case):
    _, _, path = case
    check_fusion(path, VOCAB, fused_names=("qkv_proj", "gate_up_proj"))


def _fake_quantized(path: Path, out: Path, bits: int, group: int) -> Path:
    """The checkpoint with every projection and the embedding table replaced by its affine group-quantized values
    (tests/affine_ref.py, MLX's format in numpy): the weights `--quantize` computes with."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    for name, w in tensors.items():
        if w.ndim == 2:
            tensors[name] = ref.affine_dequantize(*ref.affine_quantize(w, group, bits), group, bits)
    shutil.copytree(path, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_equals_transformers_on_the_quantized_weights(case, bits, tmp_path):
    """`--quantize` gives transformers' logits for the checkpoint holding the dequantized codes (a bound on drift
    from the float model would say little: with random weights, Gemma 2's sandwich norms amplify rounding to ~9%
    of the largest logit at 8 bits)."""
    cls = {"gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
           "gemma3": transformers.Gemma3ForCausalLM}
    name, hf, path = case
    # the reference kernels (MLX's quantized matmul) compute with exactly the dequantized codes; the native CPU
    # kernels also round activations (tests/test_native_path.py bounds them)
    model = mlxc.load(str(path), quantize=bits, group_size=32, kernels="reference")
    assert f"q{bits}g32" in str(model.program)
    fake = _fake_quantized(path, tmp_path / "q", bits, 32)
    reference = cls[name].from_pretrained(str(fake), dtype=torch.float32).eval()
    tokens = ids(VOCAB, seed=7)
    MEASURED[f"{name}.q{bits}"] = err = max_diff(np.array(model(mx.array(tokens)).logits), hf_logits(reference, tokens))
    assert err <= TOL
    assert max_diff(hf_logits(reference, tokens), hf_logits(hf, tokens)) > 1e-3  # quantization did change them


def test_lora_fresh_and_merged(case):
    _, _, path = case
    check_lora(path, VOCAB, targets=("q_proj", "v_proj", "down_proj"))


def test_artifact_round_trip(case, tmp_path):
    _, _, path = case
    check_artifact(path, tmp_path, VOCAB)


def test_peft_round_trip(built, tmp_path):
    """An adapter mlxc saves for Gemma 2 loads in peft on the transformers model and gives mlxc's logits."""
    peft = pytest.importorskip("peft")
    import mlx.utils

    hf, path = built("gemma2")
    model = mlxc.load(str(path), lora=mlxc.LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "o_proj", "up_proj")))
    rng = np.random.default_rng(11)
    model.net.load_weights([(n, mx.array(rng.normal(0, 0.05, size=a.shape).astype(np.float32)))
                            for n, a in mlx.utils.tree_flatten(model.net.parameters()) if ".lora_" in n],
                           strict=False)
    mlxc.save_adapter(model, tmp_path / "adapter")
    tokens = ids(VOCAB, seed=12)
    ours = np.array(model(mx.array(tokens)).logits)
    base = transformers.Gemma2ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert max_diff(ours, hf_logits(theirs, tokens)) <= TOL
    assert max_diff(ours, hf_logits(hf, tokens)) > 1e-3  # the adapter is not a no-op


def test_embedding_multiplier_rounds_in_the_compute_dtype(built, tmp_path):
    """transformers casts sqrt(hidden) to the weights' dtype before multiplying: sqrt(3072) = 55.43 is 55.5 in
    bfloat16. mlxc's embeddings in bfloat16 equal transformers' bit for bit (`mlxc diff`'s embeddings row)."""
    cls, config = transformers.GemmaForCausalLM, transformers.GemmaConfig(**_base(
        hidden_size=3072, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    save_checkpoint(cls, config, tmp_path / "wide", scale=0.5)
    hf = cls.from_pretrained(str(tmp_path / "wide"), dtype=torch.bfloat16).eval()
    report = mlxc.diff(str(tmp_path / "wide"), options={"dtype": "bfloat16"}, reference=hf)
    row = next(r for r in report.rows if r.name == "embeddings")
    assert row.max_abs == 0.0
    table = hf.get_input_embeddings().weight[report.tokens].detach()
    scaled_in_fp32 = (table.float() * 3072**0.5).to(torch.bfloat16)
    assert not torch.equal(scaled_in_fp32, table * torch.tensor(55.5, dtype=torch.bfloat16))  # the row can tell


@pytest.mark.parametrize("cls, config", [("Gemma2ForSequenceClassification", "Gemma2Config"),
                                         ("Gemma3TextForSequenceClassification", "Gemma3TextConfig")])
def test_sequence_classification_head(cls, config, tmp_path):
    """The task classes: the last non-padding token's hidden state through `score`, on a padded batch."""
    model_cls = getattr(transformers, cls)
    hf = save_checkpoint(model_cls, getattr(transformers, config)(**_base(
        num_hidden_layers=2, sliding_window=5, num_labels=3)), tmp_path / cls)
    tokens = ids(VOCAB, (2, 12), seed=17)
    tokens[1, 8:] = 0  # pad_token_id
    ours = np.array(mlxc.load(str(tmp_path / cls))(mx.array(tokens)).logits)
    assert ours.shape == (2, 3) and max_diff(ours, hf_logits(hf, tokens)) <= TOL


def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(case):
    """Every implementation rounds bfloat16 its own way, and random weights through sandwich norms amplify it, so
    the bar is relative: mlxc in bfloat16 is (on average over the logits) no further from the float32 model than
    transformers in bfloat16 is. Gemma's norms must round once, after (1 + w) and the product in float32, as
    transformers' do: MLX's fused norm on bfloat16 rounds before the weight and a bfloat16 (1 + w) loses bits,
    which put mlxc 11-34% further off than transformers on these models (2-14% with the float32 norms)."""
    name, hf, path = case
    tokens = ids(VOCAB, seed=16)
    exact = hf_logits(hf, tokens)
    theirs = hf_logits(type(hf).from_pretrained(str(path), dtype=torch.bfloat16).eval(), tokens)
    model = mlxc.load(str(path), dtype="bfloat16")
    ours = np.array(model(mx.array(tokens)).logits.astype(mx.float32))
    assert "rms_norm(%h_in_f32, %input_norm.gain)" in str(model.program)
    assert np.abs(ours - exact).mean() <= 1.25 * np.abs(theirs - exact).mean(), name


# ------------------------------------------------------------------------------------------------ configs


def test_specs_read_from_the_checkpoints(built):
    g = load_hf_spec(built("gemma")[1])
    assert g.norm_unit_offset and g.activation == Activation.GELU_TANH and g.tie_word_embeddings
    assert g.embedding_multiplier == 64**0.5 and g.residual == Residual.PRE_NORM and g.attention_bias
    g2 = load_hf_spec(built("gemma2")[1])
    assert g2.residual == Residual.SANDWICH and g2.query_scale == 24**-0.5
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.sliding_window) == (1.5, 2.5, WINDOW)
    assert [g2.window_of(i) for i in range(3)] == [WINDOW, None, WINDOW]
    g3 = load_hf_spec(built("gemma3")[1])
    assert g3.qk_norm and g3.final_logit_softcap is None and g3.attn_logit_softcap is None
    ropes = [g3.layer(i).attention for i in range(4)]
    assert [(a.window, a.rope_theta, a.rope.kind) for a in ropes] == [
        (WINDOW, 100.0, RopeKind.DEFAULT), (None, 5000.0, RopeKind.LINEAR), (WINDOW, 100.0, RopeKind.DEFAULT),
        (WINDOW, 100.0, RopeKind.DEFAULT)]
    assert ropes[1].rope.factor == 4.0


def test_gemma1_legacy_gelu_is_the_tanh_gelu(built, tmp_path):
    """Published Gemma configs say `hidden_act: gelu`; transformers 5 runs the tanh approximation for it."""
    _, path = built("gemma")
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu", "hidden_activation": None}))
    hf = transformers.GemmaForCausalLM.from_pretrained(str(legacy), dtype=torch.float32).eval()
    assert hf.config.hidden_act == "gelu_pytorch_tanh"
    assert load_hf_spec(legacy).activation == Activation.GELU_TANH
    check_logits(hf, mlxc.load(str(legacy)), VOCAB)


def test_gemma3_transformers4_config(built, tmp_path):
    """A transformers-4-era config: `rope_scaling` (the global layers' only), `rope_theta` and
    `rope_local_base_freq`, `sliding_window_pattern` instead of `layer_types`. Same logits as transformers."""
    _, path = built("gemma3")
    old = tmp_path / "old"
    shutil.copytree(path, old)
    cfg = json.loads((old / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        cfg.pop(key)
    cfg.update(rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=20000.0, rope_local_base_freq=50.0,
               sliding_window_pattern=3)
    (old / "config.json").write_text(json.dumps(cfg))
    hf = transformers.Gemma3ForCausalLM.from_pretrained(str(old), dtype=torch.float32).eval()
    assert hf.config.layer_types == [SLIDE, SLIDE, FULL, SLIDE]
    spec = load_hf_spec(old)
    kinds = [spec.layers[i].attention for i in range(4)]
    assert kinds == [AttentionType.SLIDING_WINDOW] * 2 + [AttentionType.FULL, AttentionType.SLIDING_WINDOW]
    glob, local = spec.layer(2).attention, spec.layer(0).attention
    assert (glob.rope_theta, glob.rope.kind, glob.rope.factor) == (20000.0, RopeKind.LINEAR, 8.0)
    assert (local.rope_theta, local.rope.kind) == (50.0, RopeKind.DEFAULT)
    check_logits(hf, mlxc.load(str(old)), VOCAB)


def _config_error(tmp_path, base: dict, **changes) -> str:
    (tmp_path / "config.json").write_text(json.dumps({**base, **changes}))
    with pytest.raises(MlxcError) as err:
        load_hf_spec(tmp_path)
    return str(err.value)


def test_bad_configs_are_refused(built, tmp_path):
    g2 = json.loads((built("gemma2")[1] / "config.json").read_text())
    g3 = json.loads((built("gemma3")[1] / "config.json").read_text())
    assert "query_pre_attn_scalar" in _config_error(tmp_path, g2, query_pre_attn_scalar=0)
    assert "final_logit_softcapping" in _config_error(tmp_path, g2, final_logit_softcapping=-1.0)
    assert "layer_types" in _config_error(tmp_path, g2, layer_types=[SLIDE, FULL])
    assert "sliding_window" in _config_error(tmp_path, g2, sliding_window=None)
    assert "use_bidirectional_attention" in _config_error(tmp_path, g3, use_bidirectional_attention=True)
    msg = _config_error(tmp_path, g3, rope_parameters={"rope_type": "linear", "factor": 2.0, **g3["rope_parameters"]})
    assert "per layer type" in msg and "'factor'" in msg
    msg = _config_error(tmp_path, {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                                   "text_config": {"model_type": "gemma3_text"}})
    assert "multimodal" in msg and "Gemma3ForCausalLM" in msg
    assert "rope type" in _config_error(tmp_path, g3, rope_parameters={SLIDE: {"rope_type": "nope"}})


# ------------------------------------------------------------------------------------------------ GGUF


def _write_gguf(src: Path, out: Path, arch: str) -> None:
    """What llama.cpp's converter writes for a Gemma checkpoint, written here from its description: the `gguf`
    package's tensor-name map, every `*norm.weight` stored as 1 + w, no LM head (tied), the metadata its
    Gemma/Gemma2/Gemma3 classes write, and a small scored sentencepiece vocabulary."""
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    cfg = json.loads((src / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma3":
        rope = cfg["rope_parameters"][FULL]
        w.add_rope_freq_base(rope["rope_theta"])
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        w.add_sliding_window(cfg["sliding_window"])
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"\u2581t{i}" for i in range(VOCAB - 4)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(VOCAB - 4)])
    w.add_token_types([3, 3, 3, 2] + [1] * (VOCAB - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    for name, arr in load_file(src / "model.safetensors").items():
        if name == "lm_head.weight":
            continue
        stored = names.get_name(name.removesuffix(".weight")) + ".weight"
        w.add_tensor(stored, (arr + 1 if name.endswith("norm.weight") else arr).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {
    "gemma": lambda: _gemma(attention_bias=False),
    # llama.cpp stores no query_pre_attn_scalar: it takes head_dim (27B aside), so the checkpoint uses head_dim
    "gemma2": lambda: _gemma2(query_pre_attn_scalar=16),
    # llama.cpp's gemma3: five sliding layers to one global, local base 10000, rope scaling on global layers only
    "gemma3": lambda: _gemma3(num_hidden_layers=7, query_pre_attn_scalar=16, layer_types=[SLIDE] * 5 + [FULL, SLIDE],
                              rope_parameters={SLIDE: {"rope_type": "default", "rope_theta": 10000.0},
                                               FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
}


@pytest.mark.parametrize("arch", sorted(GGUF_CASES))
def test_gguf_matches_the_checkpoint_it_was_written_from(arch, built, tmp_path):
    hf, path = built(f"{arch}-gguf", GGUF_CASES[arch])
    file = tmp_path / f"{arch}.gguf"
    _write_gguf(path, file, arch)
    model = mlxc.load(str(file))
    assert model.spec.family == arch and model.spec.norm_unit_offset
    text = str(model.program)
    assert "norm_plus_one.weight" in text and "shift(" not in text  # stored 1 + w, read as is: the shifts cancel
    MEASURED[f"{arch}.gguf"] = check_logits(hf, model, VOCAB)
    check_greedy(hf, model, VOCAB)
    unfused = mlxc.load(str(file), passes=["dce"])  # no fold-shapes: the layout's shift and the norm's, explicit
    assert "shift(" in str(unfused.program)
    tokens = mx.array(ids(VOCAB, seed=13))
    folded = mlxc.load(str(file), kernels="reference")  # the same kernels as `unfused`: the folding alone
    assert max_diff(np.array(unfused(tokens).logits), np.array(folded(tokens).logits)) <= 1e-5


# ------------------------------------------------------------------------------------------------ export


def test_export_gemma2_gives_transformers_the_same_logits(built, tmp_path):
    """`mlxc export` of the Gemma 2 checkpoint, of an artifact compiled from it (fused weights, norm gains 1 + w
    computed at load: export undoes both), and of the GGUF written from its twin, read by transformers."""
    hf, path = built("gemma2")
    tokens = ids(VOCAB, seed=14)
    artifact = mlxc.compile(str(path), tmp_path / "artifact")
    for src in (path, artifact):
        out = mlxc.export(str(src), tmp_path / f"from_{Path(src).name}")
        back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert type(back).__name__ == "Gemma2ForCausalLM"
        assert max_diff(hf_logits(back, tokens), hf_logits(hf, tokens)) <= 1e-6, src
    twin, twin_path = built("gemma2-gguf", GGUF_CASES["gemma2"])
    _write_gguf(twin_path, tmp_path / "g2.gguf", "gemma2")
    mlxc.export(str(tmp_path / "g2.gguf"), tmp_path / "from_gguf")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "from_gguf"), dtype=torch.float32).eval()
    assert max_diff(hf_logits(back, tokens), hf_logits(twin, tokens)) <= TOL


@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_export_other_generations(name, built, tmp_path):
    hf, path = built(name)
    mlxc.export(str(path), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    tokens = ids(VOCAB, seed=15)
    assert max_diff(hf_logits(back, tokens), hf_logits(hf, tokens)) == 0.0


# ------------------------------------------------------------------------------------------------ presets

PRESETS = {n: s for n, s in ALL_PRESETS.items() if s.family in ("gemma", "gemma2", "gemma3")}

# Parameter counts of the published checkpoints (their safetensors; the tied head once).
PUBLISHED = {
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gemma3-270m": 268_098_176,
    "functiongemma-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
}
# Gemma 3 4B/12B/27B are published with their vision tower; their language model is the published total less the
# SigLIP encoder (the same 416,866,032 parameters in all three) and the projector (1152 x hidden + a 1152 norm).
PUBLISHED_MULTIMODAL = {"gemma3-4b": 4_300_079_472, "gemma3-12b": 12_187_325_040, "gemma3-27b": 27_432_406_640}
SIGLIP = 416_866_032


@pytest.fixture(scope="module")
def meta_models():
    """Each preset's transformers model, built on the meta device from the config mlxc writes for it."""
    models = {}
    for name, spec in PRESETS.items():
        cfg = hf_config_from_spec(spec)
        config = transformers.AutoConfig.for_model(cfg["model_type"],
                                                   **{k: v for k, v in cfg.items() if k != "model_type"})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        models[name] = (config, {n: tuple(p.shape) for n, p in model.named_parameters()})
    return models


def test_every_preset_has_a_published_size():
    assert set(PRESETS) == set(PUBLISHED) | set(PUBLISHED_MULTIMODAL)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_transformers(name, meta_models):
    spec = PRESETS[name]
    config, shapes = meta_models[name]
    want = sum(prod(s) for s in shapes.values())
    assert spec.num_parameters() == want
    ours = {n: tuple(p.type.shape) for n, p in mlxc.lower(spec).parameters()}
    assert {hf_to_ir_name(n, spec.family): s for n, s in shapes.items()} == ours
    if name in PUBLISHED:
        assert want == PUBLISHED[name]
    else:
        assert want + SIGLIP + 1152 * spec.hidden_size + 1152 == PUBLISHED_MULTIMODAL[name]
    # transformers' reading of the written config: which layers slide, and each layer type's rope
    assert [t == SLIDE for t in getattr(config, "layer_types", [FULL] * spec.num_layers)] == \
        [spec.window_of(i) is not None for i in range(spec.num_layers)]
    if spec.family == "gemma3":
        for i, layer_type in enumerate(config.layer_types):
            a, rope = spec.layer(i).attention, config.rope_parameters[layer_type]
            assert (rope["rope_theta"], rope["rope_type"], rope.get("factor", 1.0)) == \
                (a.rope_theta, a.rope.kind.value, a.rope.factor)
        assert config.query_pre_attn_scalar ** -0.5 == spec.query_scale


def test_published_hyperparameters():
    assert PRESETS["gemma-2b"].attention_kind == "MQA" and PRESETS["gemma-7b"].attention_kind == "MHA"
    g2 = PRESETS["gemma2-27b"]
    assert g2.dim_per_head == 128 and g2.query_scale == 144**-0.5 and g2.final_logit_softcap == 30.0
    assert [PRESETS["gemma2-2b"].window_of(i) for i in range(4)] == [4096, None, 4096, None]
    g3 = PRESETS["gemma3-4b"]
    assert [g3.window_of(i) is None for i in range(12)] == [False] * 5 + [True] + [False] * 5 + [True]
    assert g3.layer(5).attention.rope.kind == RopeKind.LINEAR and g3.layer(0).attention.rope.kind == RopeKind.DEFAULT
    assert (g3.layer(5).attention.rope_theta, g3.layer(0).attention.rope_theta) == (1e6, 1e4)
    assert PRESETS["gemma3-27b"].query_scale == 168**-0.5 and PRESETS["gemma3-1b"].sliding_window == 512


@pytest.mark.parametrize("repo, preset", [
    ("google/gemma-2b", "gemma-2b"), ("google/gemma-1.1-7b-it", "gemma-7b"), ("google/gemma-2-2b-it", "gemma2-2b"),
    ("google/gemma-2-27b", "gemma2-27b"), ("google/gemma-3-270m-it", "gemma3-270m"), ("google/gemma-3-1b-pt",
                                                                                        "gemma3-1b"),
    ("google/gemma-3-12b-it", "gemma3-12b"), ("google/functiongemma-270m-it", "functiongemma-270m"),
])
def test_hub_ids_name_presets(repo, preset):
    assert preset_for_hub_id(repo) == preset
