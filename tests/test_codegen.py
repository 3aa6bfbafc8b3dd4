"""Generated modules for IR shapes the frontends do not produce today: layer functions with several inputs, and
values whose names collide with the module's helpers or Python builtins. Each program runs and is compared with
numpy written from the ops' meaning."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import mlxc
from mlxc.codegen import generate_module, import_module, write_module
from mlxc.ir import parse_program, verify
from mlxc.runtime import weights as W


def _run(text: str, inputs: list[np.ndarray], weights: dict[str, np.ndarray]):
    program = verify(parse_program(text))
    source = generate_module(program)
    module = import_module(write_module(source))
    net = module.Model()
    net.load_weights(W.bind(program, {k: mx.array(v) for k, v in weights.items()}))
    net.eval()
    return source, np.array(net(*[mx.array(x) for x in inputs]))


TWO_INPUT_LAYERS = """
func @layer(%x: f32[2, 4], %shift: f32[4]) -> f32[2, 4] {
  param %w: f32[4, 4]
  %y = linear(%x, %w) : f32[2, 4]
  %z = add(%y, %shift) : f32[2, 4]
  return %z
}

func @main(%x: f32[2, 4], %shift: f32[4]) -> f32[2, 4] {
  %h0 = call(%x, %shift) {callee = @layer, prefix = "layers.0"} : f32[2, 4]
  %h1 = call(%h0, %shift) {callee = @layer, prefix = "layers.1"} : f32[2, 4]
  %h2 = call(%h1, %shift) {callee = @layer, prefix = "layers.2"} : f32[2, 4]
  return %h2
}
"""


def test_layer_functions_with_two_inputs_run_as_a_loop():
    """A layer taking the hidden state and a loop-invariant second input (a review found codegen crashed with
    "call prefix 'layers.0' must be an identifier")."""
    rng = np.random.default_rng(0)
    x, shift = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    ws = {f"layers.{i}.w": rng.normal(size=(4, 4)).astype(np.float32) for i in range(3)}
    source, got = _run(TWO_INPUT_LAYERS, [x, shift], ws)
    ref = x
    for i in range(3):
        ref = ref @ ws[f"layers.{i}.w"].T + shift
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert "for layer in self.layers:" in source


def test_layer_calls_that_do_not_chain_are_called_one_by_one():
    """Two list members fed different inputs cannot be a loop; each is called as `self.layers[i]`."""
    text = TWO_INPUT_LAYERS.replace('%h1 = call(%h0, %shift)', '%h1 = call(%x, %shift)')
    rng = np.random.default_rng(1)
    x, shift = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    ws = {f"layers.{i}.w": rng.normal(size=(4, 4)).astype(np.float32) for i in range(3)}
    source, got = _run(text, [x, shift], ws)
    h1 = x @ ws["layers.1.w"].T + shift
    np.testing.assert_allclose(got, h1 @ ws["layers.2.w"].T + shift, rtol=1e-5, atol=1e-5)
    assert "self.layers[0](" in source


COLLIDING_NAMES = """
func @main(%x: f32[2, 4]) -> f32[2, 4] {
  param %w: f32[4, 4]
  %dropout = linear(%x, %w) : f32[2, 4]
  %ROPE_0 = relu(%dropout) : f32[2, 4]
  %rope_inv_freq = mul(%ROPE_0, %x) : f32[2, 4]
  %STATES = add(%rope_inv_freq, %x) : f32[2, 4]
  %zip = dropout(%STATES) {p = 0.5} : f32[2, 4]
  %len = scale(%zip) {factor = 2.0} : f32[2, 4]
  return %len
}
"""


def test_values_named_like_helpers_or_builtins_do_not_shadow_them():
    """`y = dropout(dropout, 0.1, self.training)` was what a value named `dropout` produced."""
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)
    source, got = _run(COLLIDING_NAMES, [x], {"w": w})
    h = np.maximum(x @ w.T, 0) * x + x  # dropout is the identity at inference
    np.testing.assert_allclose(got, 2.0 * h, rtol=1e-5, atol=1e-5)
    for name in ("dropout", "ROPE_0", "rope_inv_freq", "STATES", "zip", "len"):
        assert f"\n        {name} = " not in source


CONV = """func @main(%x: f32[B, T, 6]) -> f32[B, T, 6] state(conv) {
  param %w: f32[6, 1, 4]
  param %b: f32[6]
  %y = causal_conv1d(%x, %w, %b) : f32[B, T, 6]
  return %y
}
"""


def test_causal_conv1d_state_carries_the_window_across_calls():
    """A stateful op of another kind than KV: one prefill equals chunks and single steps through its conv state,
    and both equal numpy's causal convolution."""
    from mlxc.runtime.cache import ModelCache

    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(6, 1, 4)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    x = rng.normal(size=(2, 9, 6)).astype(np.float32)
    padded = np.concatenate([np.zeros((2, 3, 6), np.float32), x], axis=1)
    ref = np.stack([(padded[:, t : t + 4, :] * w[:, 0, :].T[None]).sum(axis=1) for t in range(9)], axis=1) + b
    source, full = _run(CONV, [x], {"w": w, "b": b})
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5)
    assert "STATES = [('conv', None)]" in source
    program = verify(parse_program(CONV))
    module = import_module(write_module(source))
    net = module.Model()
    net.load_weights(W.bind(program, {"w": mx.array(w), "b": mx.array(b)}))
    cache = ModelCache(net.make_cache())
    parts = [net(mx.array(x[:, :5]), cache)] + [net(mx.array(x[:, t : t + 1]), cache) for t in range(5, 9)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), ref, rtol=1e-5, atol=1e-5)
    assert not cache.rewindable and cache[0].arrays[0].shape == (2, 3, 6)


def test_decode_steps_queue_layer_by_layer_yet_run_under_transformations():
    """@main hands a one-token step to MLX layer by layer (`queue_layer`, mx.async_eval); inside grad or compile no
    evaluation is allowed, and there the same forward simply runs unqueued."""
    model = mlxc.load("tiny")
    with open(model.module_path) as f:
        assert "= queue_layer(layer(" in f.read()
    ids = mx.array([[3]])
    want = np.array(model.net(ids, 0))

    def loss(params):
        model.net.update(params)
        return model.net(ids, 0).sum()

    grads = mx.grad(loss)(model.net.trainable_parameters())
    assert np.isfinite(np.array(grads["embed_tokens"]["weight"])).all()
    np.testing.assert_allclose(np.array(mx.compile(lambda x: model.net(x, 0))(ids)), want, atol=1e-6, rtol=0)
