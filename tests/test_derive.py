"""Load-time (`derive`) ops: every op lift-params may move has a load-time implementation, and it computes what the
generated code computes for the same op."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import mlxc
from mlxc.ir import OPS
from mlxc.passes import run_pipeline
from mlxc.runtime.derive import _OPS


def test_every_liftable_op_runs_at_load_time():
    assert {name for name, d in OPS.items() if not d.effects} <= set(_OPS)


def test_lifted_weight_math_matches_running_it_in_the_body():
    """A program whose body scales and adds weights before a matmul: lifting that work to load time (so the artifact
    stores its result) leaves the logits unchanged."""
    text = """
func @main(%input_ids: i32[B, T]) -> f32[B, T, 16] {
  param %embed_tokens.weight: f32[16, 8]
  param %w.weight: f32[16, 8]
  param %delta.weight: f32[16, 8]
  param %norm.weight: f32[8]
  %h = embed(%input_ids, %embed_tokens.weight) : f32[B, T, 8]
  %d = scale(%delta.weight) {factor = 0.5} : f32[16, 8]
  %w2 = add(%w.weight, %d) : f32[16, 8]
  %w3 = rms_norm(%w2, %norm.weight) {eps = 1e-05} : f32[16, 8]
  %logits = linear(%h, %w3) : f32[B, T, 16]
  return %logits
}
"""
    program = mlxc.ir.verify(mlxc.ir.parse_program(text))
    lifted = run_pipeline(program, ["lift-params"])
    assert len(lifted.main.derived) == 3 and len(lifted.main.ops) == 2
    ids = mx.array([[1, 2, 3, 4]])
    outs = []
    for p in (program, lifted):
        from mlxc.codegen import generate_module, import_module, write_module
        from mlxc.runtime import weights as W

        module = import_module(write_module(generate_module(p)))
        net = module.Model()
        net.load_weights(W.bind(p, W.random_weights(p, seed=1, scale=0.5)))
        outs.append(np.array(net(ids)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)
