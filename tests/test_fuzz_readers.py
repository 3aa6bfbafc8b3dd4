"""Fuzzing every reader other than GGUF's (tests/test_fuzz_gguf.py) with mutated real files and hypothesis.

The inputs are real: a random-weight transformers Llama (`save_pretrained`) with SmolLM2's shrunk tokenizer and chat
template, a LoRA adapter saved by peft, spec files, the checkpoint's program dumped as IR text and JSON, and an
artifact `mlxc compile` wrote. Each case mutates one of them (tests/fuzz_targets.py says how) and goes through the
entry point a user hits, in a worker process with a time limit per case and an address-space ceiling (fuzzlib.py).
Every case must load or fail with one MlxcError: a traceback, a hang or a death is a finding and fails the test.

Counts are per target; `pytest -m fuzz` runs MLXC_FUZZ_SCALE (20) times as many, with other seeds.
"""

from __future__ import annotations

import pytest

from fuzzlib import HOSTILE_TEMPLATES, Worker, check, long_run, reader_inputs, scale

pytest.importorskip("gguf")
pytest.importorskip("peft")
pytest.importorskip("hypothesis")

MODES = ["quick", pytest.param("long", marks=pytest.mark.fuzz)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return reader_inputs(tmp_path_factory.mktemp("fuzz-readers"))


@pytest.fixture(scope="module")
def worker():
    """One worker for the module (a new process only after a hang or a death): starting one costs seconds."""
    with Worker(timeout=30.0, memory_gb=6.0) as w:
        yield w


def _run(worker, request, mode, target, quick, setup, seed, min_ok=0):
    if mode == "long" and not long_run(request):
        pytest.skip("the long run: pytest -m fuzz")
    n = quick * scale(request)
    seed = seed if mode == "quick" else seed + 1000  # the long run explores other cases than the quick one
    out = [worker.run(target, {**setup, "case": k, "seed": seed}) for k in range(n)]
    return check(out, target, min_ok=min_ok)


@pytest.mark.parametrize("mode", MODES)
def test_safetensors(inputs, worker, request, mode):
    _run(worker, request, mode, "safetensors", 250, {"ckpt": inputs["ckpt"], "load_every": 8}, seed=11, min_ok=10)


@pytest.mark.parametrize("mode", MODES)
def test_hf_config(inputs, worker, request, mode):
    _run(worker, request, mode, "hf_config", 150, {"ckpt": inputs["ckpt"], "load_every": 8}, seed=12, min_ok=10)


@pytest.mark.parametrize("mode", MODES)
def test_spec_files(inputs, worker, request, mode):
    _run(worker, request, mode, "spec", 120, {"specs": inputs["specs"], "load_every": 4}, seed=13,
         min_ok=1)


@pytest.mark.parametrize("mode", MODES)
def test_peft_adapters(inputs, worker, request, mode):
    _run(worker, request, mode, "peft", 200, {"adapter": inputs["adapter"], "base": inputs["ckpt"], "load_every": 8},
         seed=14, min_ok=10)


@pytest.mark.parametrize("mode", MODES)
def test_tokenizer_files(inputs, worker, request, mode):
    _run(worker, request, mode, "tokenizer", 120, {"dir": inputs["tokenizer"], "templates": HOSTILE_TEMPLATES,
                                                   "seconds": 1.0}, seed=15, min_ok=10)


def test_hostile_chat_templates(inputs, worker):
    """Every hostile template (escapes through Python internals, runaway loops and recursion, huge strings and lists)
    ends in an MlxcError within a 2 s deadline, or renders something short and harmless."""
    out = [worker.run("template", {"template": t, "dir": inputs["tokenizer"], "seconds": 2.0, "case": i})
           for i, t in enumerate(HOSTILE_TEMPLATES)]
    check(out, "template")
    import os

    assert not os.path.exists(worker.scratch / "pwned"), "a template ran a shell command"


@pytest.mark.parametrize("mode", MODES)
def test_ir_text(inputs, worker, request, mode):
    _run(worker, request, mode, "ir_text", 250, {"base": inputs["ir_text"]}, seed=16)


@pytest.mark.parametrize("mode", MODES)
def test_ir_json(inputs, worker, request, mode):
    _run(worker, request, mode, "ir_json", 200, {"base": inputs["ir_json"]}, seed=17)


@pytest.mark.parametrize("mode", MODES)
def test_artifacts(inputs, worker, request, mode):
    _run(worker, request, mode, "artifact", 80, {"artifact": inputs["artifact"]}, seed=18, min_ok=2)


PROPERTY_EXAMPLES = {"gguf_header": 100, "safetensors_header": 300, "ir_text": 300, "spec_mapping": 100}


@pytest.mark.parametrize("prop", list(PROPERTY_EXAMPLES))
@pytest.mark.parametrize("mode", MODES)
def test_hypothesis(worker, request, mode, prop):
    """Structures hypothesis draws (not mutations of a file): a property fails with hypothesis's falsifying
    example."""
    if mode == "long" and not long_run(request):
        pytest.skip("the long run: pytest -m fuzz")
    n = PROPERTY_EXAMPLES[prop] * scale(request)
    out = worker.run("property", {"property": prop, "examples": n, "seed": 21 if mode == "quick" else 1021,
                                  "case": prop}, timeout=60 + n)
    check([out], f"hypothesis {prop} ({n} examples)")
