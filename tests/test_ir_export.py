"""JSON and DOT exports: JSON attributes are typed values a program can read without mlxc's IR parser; DOT names
the values a function returns."""

from __future__ import annotations

import json

import pytest

import mlxc
from mlxc.ir import ParseError, from_json, print_program, to_dot, to_json


@pytest.fixture(scope="module")
def program():
    return mlxc.api.program_for("preset:llama3.1-8b", kernels="reference")  # its rope and attention ops unfused


def _ops(doc, name):
    return [o for f in doc["functions"] for o in f["ops"] + f["derived"] if o["op"] == name]


def test_json_attributes_are_typed_values(program):
    doc = json.loads(to_json(program))
    rope = _ops(doc, "rope")[0]["attrs"]
    assert rope["dims"] == 128 and type(rope["dims"]) is int
    assert rope["base"] == 500000.0 and type(rope["base"]) is float
    assert rope["traditional"] is False
    assert rope["scaling"] == {"kind": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert _ops(doc, "reshape")[0]["attrs"]["shape"] == ["B", "T", 32, 128]
    assert {o["attrs"]["callee"] for o in _ops(doc, "call")} == {"decoder_layer", "attention", "mlp"}
    assert _ops(doc, "attention")[0]["attrs"]["window"] is None


def test_json_round_trips_and_rejects_bad_attributes(program):
    text = to_json(program)
    assert print_program(from_json(text)) == print_program(program)
    doc = json.loads(text)
    _ops(doc, "rope")[0]["attrs"]["dims"] = "128"
    with pytest.raises(ParseError, match="dims"):
        from_json(json.dumps(doc))
    doc = json.loads(text)
    _ops(doc, "rope")[0]["attrs"]["scaling"] = {"kind": "llama3", "nonsense": 1}
    with pytest.raises(ParseError, match="scaling"):
        from_json(json.dumps(doc))


def test_dot_labels_name_the_returned_values(program):
    dot = to_dot(program)
    assert 'label="return %logits"' in dot
    assert 'label="return 0"' not in dot
