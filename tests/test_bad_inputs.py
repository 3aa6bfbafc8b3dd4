"""Bad inputs give one clear `mlxc.MlxcError` that names the problem: no tracebacks from deep inside, no hangs,
and no half-written output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import mlx.core as mx  # noqa: E402

import mlxc  # noqa: E402
from mlxc import MlxcError  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    mlxc.load(str(path))  # the starting point is fine
    return path


@pytest.fixture
def ckpt(good_dir, tmp_path) -> Path:
    """A private copy of the good checkpoint to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(good_dir, path)
    return path


@pytest.fixture(scope="module")
def tiny():
    return mlxc.load("preset:tiny")


def _edit_tensors(path: Path, edit) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _error(src, **kwargs) -> str:
    with pytest.raises(MlxcError) as info:
        mlxc.load(src, **kwargs)
    msg = str(info.value)
    assert msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------------------------- checkpoints


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    msg = _error(str(ckpt))
    assert "missing" in msg and "layers.1.mlp.up_proj.weight" in msg


def test_several_missing_tensors_are_counted(ckpt):
    def edit(t):
        for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
            t.pop(name)

    _edit_tensors(ckpt, edit)
    msg = _error(str(ckpt))
    assert "missing" in msg and "k_proj.weight" in msg and "1 more" in msg


def test_unexpected_tensor_unknown_name(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.extra_scale", np.ones(4, np.float32)))
    msg = _error(str(ckpt))
    assert "unexpected" in msg and "model.layers.0.self_attn.extra_scale" in msg


def test_unexpected_tensor_for_a_layer_the_config_lacks(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", np.ones((128, 64), np.float32)))
    msg = _error(str(ckpt))
    assert "unexpected" in msg and "layers.7.mlp.up_proj.weight" in msg


def test_misshaped_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.norm.weight", np.ones(65, np.float32)))
    msg = _error(str(ckpt))
    assert "norm.weight" in msg and "[65]" in msg and "[64]" in msg


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _error(str(ckpt))
    assert "model.safetensors" in msg


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    msg = _error(str(ckpt))
    assert "model.safetensors" in msg


def test_empty_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"")
    assert "model.safetensors" in _error(str(ckpt))


def test_no_weight_files(ckpt):
    (ckpt / "model.safetensors").unlink()
    msg = _error(str(ckpt))
    assert "safetensors" in msg


def test_shard_index_lists_missing_shard(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors",
                                           "lm_head.weight": "model-00001-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors" in _error(str(ckpt))


def test_malformed_shard_index(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    assert "index" in _error(str(ckpt))


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text('{"vocab_size": 300,')
    msg = _error(str(ckpt))
    assert "config.json" in msg and "malformed JSON" in msg


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    assert "config.json" in _error(str(ckpt))


def test_config_missing_required_key(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "hidden_size" in _error(str(ckpt))


@pytest.mark.parametrize("arch,model_type", [("GPT2LMHeadModel", "gpt2"), ("CohereForCausalLM", "cohere")])
def test_unknown_architecture_lists_supported(ckpt, arch, model_type):
    """A declared unsupported architecture is an error even though the tensors have Llama's names (Cohere's do, and
    its math differs): the tensor-name fallback is only for configs that declare nothing."""
    config = json.loads((ckpt / "config.json").read_text())
    config.update(architectures=[arch], model_type=model_type)
    (ckpt / "config.json").write_text(json.dumps(config))
    msg = _error(str(ckpt))
    assert "unsupported architecture" in msg and arch in msg
    assert "LlamaForCausalLM" in msg and "MistralForCausalLM" in msg


def test_config_without_metadata_is_detected_from_tensor_names(ckpt, good_dir):
    config = json.loads((ckpt / "config.json").read_text())
    del config["architectures"], config["model_type"]
    (ckpt / "config.json").write_text(json.dumps(config))
    ids = [[1, 2, 3, 4]]
    assert mlxc.load(str(ckpt)).spec.family == "llama"
    np.testing.assert_array_equal(np.array(mlxc.load(str(ckpt))(ids).logits),
                                  np.array(mlxc.load(str(good_dir))(ids).logits))


def test_directory_with_neither_config_nor_manifest(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    msg = _error(str(tmp_path))
    assert "config.json" in msg and "manifest.json" in msg


def test_nonexistent_path():
    msg = _error("/definitely/not/here/model")
    assert "/definitely/not/here/model" in msg


def test_unknown_preset():
    msg = _error("preset:nope")
    assert "unknown preset 'nope'" in msg and "tiny" in msg


def test_close_preset_name_is_suggested():
    assert "did you mean 'tiny'" in _error("preset:tinyy")


def test_unknown_bare_name():
    msg = _error("nope")
    assert "nope" in msg and "preset" in msg


def test_gguf_truncated_header(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00")
    msg = _error(str(f))
    assert "model.gguf" in msg and "truncated" in msg


def test_unrecognized_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 16)
    assert "weights.bin" in _error(str(f))


def test_malformed_spec_file(tmp_path):
    (tmp_path / "m.yaml").write_text("vocab_size: [1, 2\n")
    assert "m.yaml" in _error(tmp_path / "m.yaml")
    (tmp_path / "m.json").write_text('{"vocab_size": -1, "hidden_size": 64, "intermediate_size": 128, '
                                      '"num_layers": 1, "num_heads": 4}')
    assert "vocab_size" in _error(tmp_path / "m.json")


def test_corrupt_artifact_manifest(tmp_path):
    out = mlxc.compile("preset:tiny", tmp_path / "a")
    (out / "manifest.json").write_text("{oops")
    assert "manifest" in _error(out)


def test_adapter_folder_missing(tmp_path):
    msg = _error("preset:tiny", adapter=str(tmp_path))
    assert "adapter_config.json" in msg and str(tmp_path) in msg


def test_adapter_with_unsupported_option(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_dora": true}')
    msg = _error("preset:tiny", adapter=str(tmp_path))
    assert "use_dora" in msg and "not supported" in msg


# ------------------------------------------------------------------------------------------------- inputs to a model


@pytest.mark.parametrize(
    "ids,needle",
    [
        ([[1, 2, 256]], "256"),
        ([[1, 2, 100000]], "100000"),
        ([[-1, 2, 3]], "-1"),
        ([[1.0, 2.0]], "integers"),
        (np.array([[0.5, 1.5]], np.float32), "integers"),
        ([], "empty"),
        ([[]], "empty"),
        (np.zeros((1, 2, 3), np.int32), "[batch, seq]"),
    ],
)
def test_bad_token_ids(tiny, ids, needle):
    for call in (lambda: tiny(ids), lambda: tiny.generate(ids, max_new_tokens=2), lambda: list(tiny.stream(ids))):
        with pytest.raises(MlxcError) as info:
            call()
        assert needle in str(info.value)


def test_out_of_range_mentions_vocabulary(tiny):
    with pytest.raises(MlxcError, match="out of range for vocabulary of 256"):
        tiny(mx.array([[3, 256]]))


def test_labels_shape_mismatch(tiny):
    with pytest.raises(MlxcError) as info:
        tiny([[1, 2, 3]], labels=[[1, 2]])
    assert "labels shape" in str(info.value) and "[1, 2]" in str(info.value) and "[1, 3]" in str(info.value)


def test_generate_text_without_tokenizer(tiny):
    with pytest.raises(MlxcError, match="no tokenizer"):
        list(tiny.generate_text("hello"))


def test_unknown_dtype():
    with pytest.raises(MlxcError) as info:
        mlxc.load("preset:tiny", dtype="float8")
    assert "float8" in str(info.value)


def test_unknown_pass():
    with pytest.raises(MlxcError, match="unknown pass 'nope'"):
        mlxc.load("preset:tiny", passes=["nope"])


# ------------------------------------------------------------------------------------------------- compile output


def test_compile_into_existing_dir_without_overwrite(tmp_path):
    out = mlxc.compile("preset:tiny", tmp_path / "a", seed=1)
    before = (out / "weights.safetensors").read_bytes()
    with pytest.raises(MlxcError, match="already exists"):
        mlxc.compile("preset:tiny", out, seed=2)
    assert (out / "weights.safetensors").read_bytes() == before
    # a plain existing directory is refused too, even with overwrite, if it is not an artifact and not empty
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(MlxcError):
        mlxc.compile("preset:tiny", other)
    with pytest.raises(MlxcError, match="not an mlxc artifact"):
        mlxc.compile("preset:tiny", other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mine"]


def test_compile_artifact_source_refused(tmp_path):
    out = mlxc.compile("preset:tiny", tmp_path / "a")
    with pytest.raises(MlxcError, match="already a compiled artifact"):
        mlxc.compile(out, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_failed_compile_leaves_nothing(ckpt, tmp_path):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight"))
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(MlxcError, match="q_proj.weight"):
        mlxc.compile(str(ckpt), parent / "artifact")
    assert not (parent / "artifact").exists()
    assert list(parent.iterdir()) == []  # no temporary siblings either


def test_failed_overwrite_keeps_old_artifact(ckpt, tmp_path):
    out = mlxc.compile("preset:tiny", tmp_path / "a")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.norm.weight", np.ones(3, np.float32)))
    with pytest.raises(MlxcError):
        mlxc.compile(str(ckpt), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ckpt"]


def test_artifact_write_failure_cleans_up(tmp_path, monkeypatch):
    """An error while the artifact is being written (here: saving the weights) removes the temporary directory."""
    from mlxc.runtime import artifact as art

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(art.mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        mlxc.compile("preset:tiny", tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- hub


def test_hub_id_offline(tmp_path):
    """No network and an empty cache: a quick MlxcError that mentions the hub (run apart: huggingface_hub reads
    HF_HUB_OFFLINE / HF_HOME when it is imported)."""
    script = textwrap.dedent(
        """
        import mlxc
        try:
            mlxc.load("someorg/somemodel")
        except mlxc.MlxcError as e:
            print("MLXC_ERROR:", e)
        else:
            print("NO ERROR")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub")}
    env.pop("HF_ENDPOINT", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith(("MLXC_ERROR", "NO ERROR")))
    assert line.startswith("MLXC_ERROR:")
    assert "someorg/somemodel" in line and "Hub" in line
    assert "Traceback" not in proc.stderr
