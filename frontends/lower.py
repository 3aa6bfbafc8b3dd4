"""Lower a ModelSpec into IR: @attention and @mlp blocks, a @decoder_layer calling them, and @main.

Each distinct layer configuration becomes one function that @main calls once per layer with prefix `layers.{i}`,
so a 32-layer model is one layer body and 32 calls, not 32 pasted copies.
"""

from __future__ import annotations

from ..ir import DType, FunctionBuilder, Program, TensorType, Value, verify
from .spec import Activation, FFNType, ModelSpec, NormType, PositionEmbedding

B, T = "B", "T"

_ACT_OPS = {
    Activation.SILU: "silu",
    Activation.GELU: "gelu",
    Activation.GELU_TANH: "gelu_tanh",
    Activation.RELU: "relu",
}


class _Lowering:
    def __init__(self, spec: ModelSpec, dtype: DType):
        self.spec, self.dtype = spec, dtype
        self.program = Program()

    def t(self, *shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def norm(self, b: FunctionBuilder, x: Value, prefix: str, name: str) -> Value:
        h = self.spec.hidden_size
        w = b.param(f"{prefix}.weight", self.t(h))
        if self.spec.norm == NormType.RMS:
            return b.op("rms_norm", x, w, eps=self.spec.norm_eps, name=name)
        bias = b.param(f"{prefix}.bias", self.t(h))
        return b.op("layer_norm", x, w, bias, eps=self.spec.norm_eps, name=name)

    def linear(self, b: FunctionBuilder, x: Value, prefix: str, out: int, inp: int, bias: bool, name: str) -> Value:
        w = b.param(f"{prefix}.weight", self.t(out, inp))
        bb = b.param(f"{prefix}.bias", self.t(out)) if bias else None
        return b.op("linear", x, w, bb, name=name)

    def attention(self, fname: str, window: int | None) -> str:
        s = self.spec
        h, d, nq, nkv = s.hidden_size, s.dim_per_head, s.num_heads, s.kv_heads
        b = FunctionBuilder(fname, self.program)
        x = b.input("x", self.t(B, T, h))
        q = self.linear(b, x, "q_proj", nq * d, h, s.attention_bias, "q")
        k = self.linear(b, x, "k_proj", nkv * d, h, s.attention_bias, "k")
        v = self.linear(b, x, "v_proj", nkv * d, h, s.attention_bias, "v")
        heads = []
        for val, n, nm in ((q, nq, "q"), (k, nkv, "k"), (v, nkv, "v")):
            r = b.op("reshape", val, shape=[B, T, n, d], name=f"{nm}_heads")
            heads.append(b.op("transpose", r, perm=[0, 2, 1, 3], name=f"{nm}_t"))
        q, k, v = heads
        if s.position == PositionEmbedding.ROPE:
            rope = dict(dims=d, base=s.rope.theta, scaling=s.rope.scaling(s.max_position_embeddings))
            q = b.op("rope", q, name="q_rot", **rope)
            k = b.op("rope", k, name="k_rot", **rope)
        o = b.op("attention", q, k, v, scale=d**-0.5, window=window, name="attn")
        o = b.op("transpose", o, perm=[0, 2, 1, 3], name="attn_t")
        o = b.op("reshape", o, shape=[B, T, nq * d], name="attn_flat")
        out = self.linear(b, o, "o_proj", h, nq * d, s.out_bias, "out")
        b.build(out)
        return fname

    def mlp(self) -> str:
        s = self.spec
        h, i = s.hidden_size, s.intermediate_size
        b = FunctionBuilder("mlp", self.program)
        x = b.input("x", self.t(B, T, h))
        act = _ACT_OPS[s.activation]
        if s.ffn == FFNType.GATED:
            gate = self.linear(b, x, "gate_proj", i, h, s.mlp_bias, "gate")
            up = self.linear(b, x, "up_proj", i, h, s.mlp_bias, "up")
            hidden = b.op("mul", b.op(act, gate, name="gate_act"), up, name="hidden")
        else:
            up = self.linear(b, x, "up_proj", i, h, s.mlp_bias, "up")
            hidden = b.op(act, up, name="hidden")
        b.build(self.linear(b, hidden, "down_proj", h, i, s.mlp_bias, "out"))
        return "mlp"

    def decoder_layer(self, fname: str, attn_fn: str, mlp_fn: str) -> str:
        b = FunctionBuilder(fname, self.program)
        x = b.input("x", self.t(B, T, self.spec.hidden_size))
        h = self.norm(b, x, "input_norm", "h")
        a = b.op("call", h, callee=attn_fn, prefix="attn", name="attn")
        x = b.op("add", x, a, name="x_attn")
        h = self.norm(b, x, "post_attention_norm", "h_mlp")
        m = b.op("call", h, callee=mlp_fn, prefix="mlp", name="mlp")
        b.build(b.op("add", x, m, name="out"))
        return fname

    def lower(self) -> Program:
        s = self.spec
        mlp_fn = self.mlp()
        layer_fns: dict[int | None, str] = {}
        windows = [s.window_of(i) for i in range(s.num_layers)]
        for w in dict.fromkeys(windows):
            suffix = "" if len(set(windows)) == 1 else ("_local" if w else "_global")
            attn = self.attention("attention" + suffix, w)
            layer_fns[w] = self.decoder_layer("decoder_layer" + suffix, attn, mlp_fn)

        b = FunctionBuilder("main", self.program)
        ids = b.input("input_ids", TensorType(DType.I32, (B, T)))
        table = b.param("embed_tokens.weight", self.t(s.vocab_size, s.hidden_size))
        h = b.op("embed", ids, table, name="h")
        for i, w in enumerate(windows):
            h = b.op("call", h, callee=layer_fns[w], prefix=f"layers.{i}", name="h")
        h = self.norm(b, h, "norm", "h_final")
        head = table if s.tie_word_embeddings else b.param("lm_head.weight", self.t(s.vocab_size, s.hidden_size))
        b.build(b.op("linear", h, head, name="logits"))
        # callees first, entry last: reads top-down like a source file
        self.program.functions.sort(key=lambda f: f.name == "main")
        return verify(self.program)


def lower(spec: ModelSpec, dtype: DType | str = DType.F32) -> Program:
    """The IR program for `spec`, with every parameter and activation in `dtype`."""
    return _Lowering(spec, DType.parse(dtype) if isinstance(dtype, str) else dtype).lower()
