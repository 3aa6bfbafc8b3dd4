"""Spec files: YAML and JSON round trips, and errors that name the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlxc.frontends.presets import PRESETS
from mlxc.frontends.spec import AttentionType, LayerSpec, ModelSpec, RopeSpec
from mlxc.frontends.spec_file import dump_spec_file, load_spec_file
from mlxc.ir.attrs import RopeKind
from mlxc.ir.errors import MlxcError


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("name", ["tiny", "llama3.2-1b", "mistral-7b"])
def test_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    spec = PRESETS[name]
    path = tmp_path / f"spec{suffix}"
    dump_spec_file(spec, path)
    assert load_spec_file(path) == spec
    data = json.loads(path.read_text()) if suffix == ".json" else yaml.safe_load(path.read_text())
    assert "layers" not in data  # uniform stacks are derived, not spelled out


def test_round_trip_hybrid_layers(tmp_path: Path) -> None:
    layers = (LayerSpec(attention=AttentionType.SLIDING_WINDOW), LayerSpec())
    spec = ModelSpec(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     sliding_window=8, layers=layers)
    dump_spec_file(spec, tmp_path / "h.yaml")
    assert load_spec_file(tmp_path / "h.yaml").layers == layers


def test_load_handwritten_yaml(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "name: mine\nvocab_size: 100\nhidden_size: 64\nintermediate_size: 128\nnum_layers: 2\nnum_heads: 4\n"
        "num_kv_heads: 1\nactivation: gelu\nrope:\n  kind: llama3\n  theta: 500000\n  factor: 8\n"
        "  original_max_position_embeddings: 8192\neos_token_ids: [1, 2]\n"
    )
    spec = load_spec_file(path)
    assert spec.name == "mine" and spec.attention_kind == "MQA" and spec.eos_token_ids == (1, 2)
    assert spec.rope == RopeSpec(kind=RopeKind.LLAMA3, theta=5e5, factor=8, original_max_position_embeddings=8192)


def test_invalid_field_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"vocab_size": 10, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                                "num_heads": 4, "rope": {"kind": "spiral"}, "colour": "red"}))
    with pytest.raises(MlxcError) as exc:
        load_spec_file(path)
    msg = str(exc.value)
    assert "bad.json" in msg and "rope.kind" in msg and "colour" in msg


def test_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 10\nhidden_size: 64\n")
    with pytest.raises(MlxcError, match=r"m\.yaml(.|\n)*intermediate_size: Field required"):
        load_spec_file(path)


def test_whole_model_check(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 10\nhidden_size: 64\nintermediate_size: 8\nnum_layers: 1\nnum_heads: 4\n"
                    "num_kv_heads: 3\n")
    with pytest.raises(MlxcError, match="must be a multiple of num_kv_heads"):
        load_spec_file(path)


def test_unreadable_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(MlxcError, match="cannot read spec file"):
        load_spec_file(tmp_path / "absent.yaml")
    (tmp_path / "a.json").write_text("{oops")
    with pytest.raises(MlxcError, match=r"a\.json: malformed JSON"):
        load_spec_file(tmp_path / "a.json")
    (tmp_path / "a.yaml").write_text("a: [1,\n")
    with pytest.raises(MlxcError, match=r"a\.yaml: malformed YAML"):
        load_spec_file(tmp_path / "a.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MlxcError, match="expected a mapping"):
        load_spec_file(tmp_path / "list.yaml")
