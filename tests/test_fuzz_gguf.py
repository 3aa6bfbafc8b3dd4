"""Fuzzing the GGUF reader with mutated real files: SmolLM2's own header (metadata and tensor table), and a small
GGUF made like it with every tensor present, so mutations reach tensor reading, compiling and running too.

Each case mutates counts, string and array lengths, value and tensor types, dimensions, offsets and alignment to edge
values, flips header bytes, duplicates or drops bytes, or cuts the file short, then goes through
`read_source(..., weights=False)` (what `mlxc inspect` reads) or `read_gguf_source` (weights evaluated) and, for
some, `mlxc.load` and a forward pass, in a worker with a time limit and a memory ceiling. Every case must load or
fail with one MlxcError. `pytest -m fuzz` runs MLXC_FUZZ_SCALE (20) times as many cases, with other seeds."""

from __future__ import annotations

import pytest

from fuzzlib import check, run_cases, scale, smollm2_header, tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-gguf")
    header, size = smollm2_header(d / "smollm2-header.gguf")
    return {"tiny": str(tiny_gguf(d / "tiny.gguf")), "header": str(header), "size": size}


def _cases(request, quick: int) -> int:
    return quick * scale(request)


@pytest.mark.parametrize("mode", ["quick", pytest.param("long", marks=pytest.mark.fuzz)])
def test_gguf_files(inputs, request, mode):
    if mode == "long" and scale(request) == 1:
        pytest.skip("the long run: pytest -m fuzz")
    out = run_cases("gguf", _cases(request, 250), seed=1 if mode == "quick" else 1001, setup={"base": inputs["tiny"], "load_every": 8})
    check(out, "gguf (tiny SmolLM2-like file)", min_ok=5)


@pytest.mark.parametrize("mode", ["quick", pytest.param("long", marks=pytest.mark.fuzz)])
def test_smollm2_header(inputs, request, mode):
    if mode == "long" and scale(request) == 1:
        pytest.skip("the long run: pytest -m fuzz")
    out = run_cases("gguf_header", _cases(request, 10), seed=2 if mode == "quick" else 1002,
                    setup={"header": inputs["header"], "size": inputs["size"]})
    check(out, "gguf (SmolLM2 header)")
