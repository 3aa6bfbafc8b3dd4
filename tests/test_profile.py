"""`mlxc bench --profile` (runtime/profile.py): one step of the generated module, op statement by op statement.

The profile re-imports the model's own module with a checkpoint after each op statement; what it reports has to
match the program it came from: one row per op kind, as many calls per step as the program runs ops of that kind.
"""

from __future__ import annotations

import re

import pytest

import mlxc
from mlxc.cli import main
from mlxc.runtime.profile import instrument, kind_of, profile_decode


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_kinds_of_the_fused_and_native_statements():
    assert kind_of("native_qkv_attention(ROPE_0, qkv, offset, cache, heads=9)").startswith("qkv_attention: native")
    assert kind_of("native_glu(gate_up, 'silu', nn.silu)") == "glu: native"
    assert kind_of("qkv_attention(ROPE_0, qkv, offset, cache, heads=9)") == "qkv_attention"
    assert kind_of("B") is None and kind_of("x.shape[0]") is None


def test_instrument_checkpoints_every_op_statement_of_a_call():
    source = "class M(nn.Module):\n    def __call__(self, x):\n        h = nn.silu(x)\n        y = h + x\n" \
             "        return y\n"
    lines = instrument(source).splitlines()
    assert lines[3] == "        _checkpoint('activation', h)" and lines[5] == "        _checkpoint('add / mul', y)"


@pytest.mark.parametrize("prefill", [False, True])
def test_profile_counts_what_the_program_runs(prefill):
    model = mlxc.load("preset:tiny", seed=0)
    p = profile_decode(model, prompt_len=8, steps=2, prefill=prefill)
    layers = sum(1 for o in model.program.main.ops if o.op == "call")
    norms = sum(1 for fn in model.program.functions for o in fn.ops if o.op == "rms_norm")
    calls = {kind: n for kind, n, _ in p.rows}
    rms = [n for kind, n in calls.items() if kind.startswith("rms_norm")]
    assert rms == [(norms - 1) * layers + 1]  # two per layer (in @decoder_layer) and the final one (in @main)
    assert p.step_ms > 0 and p.profiled_ms > 0 and all(ms >= 0 for _, _, ms in p.rows)


def test_cli_profile_prints_a_table_and_refuses_what_cannot_apply(capsys):
    code, out, err = _run(capsys, "bench", "preset:tiny", "--profile", "--prompt-len", "8", "--gen-len", "2")
    assert code == 0 and "by op kind" in out and re.search(r"rms_norm\S*\s.*\s\d+\s", out)
    assert "a plain step takes" in err
    code, _, err = _run(capsys, "bench", "preset:tiny", "--profile", "--compare", "fusion")
    assert code == 1 and "--profile" in err and "--compare" in err
    code, _, err = _run(capsys, "bench", "preset:tiny", "--profile", "--batch", "2")
    assert code == 1 and "--batch" in err
