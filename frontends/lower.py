"""Lower a ModelSpec into IR: block builders for attention, feed-forward (dense, gated, mixture of experts), the
decoder layer around them, and @main with embeddings and the task head.

Each distinct layer configuration (`ModelSpec.layer(i)`) becomes one function that @main calls once per layer with
prefix `layers.{i}`, so a 32-layer model is one layer body and 32 calls; Gemma 2's alternating sliding and global
layers are two bodies.

Parameter names follow Llama's checkpoint roles: `input_norm` before attention and `post_attention_norm` before the
FFN; sandwich blocks add `attn_out_norm` and `ffn_out_norm` on the two outputs. Families map their checkpoint names
onto these (frontends/families/).
"""

from __future__ import annotations

from ..ir import DType, FunctionBuilder, Program, TensorType, Value, verify
from .blocks import builder, ffn_builder
from .spec import (AttentionConfig, FFNConfig, FFNType, HeadKind, LayerConfig, ModelSpec, NormConfig, NormType,
                   PositionEmbedding, Residual)

B, T = "B", "T"
OFFSET = TensorType(DType.I32, ())  # the position of a call's first token, an explicit input of every model


class _Lowering:
    def __init__(self, spec: ModelSpec, dtype: DType):
        self.spec, self.dtype = spec, dtype
        self.program = Program()

    def t(self, *shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    # ------------------------------------------------------------------------------------------------ components

    def norm(self, b: FunctionBuilder, x: Value, prefix: str, name: str, cfg: NormConfig, size: int) -> Value:
        w = b.param(f"{prefix}.weight", self.t(size))
        # Gemma's norms compute (1 + w) and the product in float32 and round once (transformers:
        # `(x * (1 + w.float())).type_as(x)`), so below float32 the gain and the norm run in float32
        upcast = cfg.unit_offset and cfg.kind == NormType.RMS and self.dtype != DType.F32
        if cfg.unit_offset:
            if upcast:
                w = b.derive("cast", w, dtype=DType.F32, name=f"{prefix}.weight_f32")
            w = b.derive("shift", w, value=1.0, name=f"{prefix}.gain")
        if upcast:
            x = b.op("cast", x, dtype=DType.F32, name=f"{name}_in_f32")
            return b.op("cast", b.op("rms_norm", x, w, eps=cfg.eps, name=f"{name}_f32"), dtype=self.dtype, name=name)
        if cfg.kind == NormType.RMS:
            return b.op("rms_norm", x, w, eps=cfg.eps, name=name)
        bias = b.param(f"{prefix}.bias", self.t(size)) if cfg.bias else None
        return b.op("layer_norm", x, w, bias, eps=cfg.eps, name=name)

    def linear(self, b: FunctionBuilder, x: Value, prefix: str, out: int, inp: int, bias: bool, name: str) -> Value:
        w = b.param(f"{prefix}.weight", self.t(out, inp))
        bb = b.param(f"{prefix}.bias", self.t(out)) if bias else None
        return b.op("linear", x, w, bb, name=name)

    # ------------------------------------------------------------------------------------------------ blocks

    def attention(self, fname: str, a: AttentionConfig, norm: NormConfig) -> str:
        h, d, nq, nkv = self.spec.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads
        b = FunctionBuilder(fname, self.program)
        x = b.input("x", self.t(B, T, h))
        offset = b.input("offset", OFFSET) if a.rope is not None else None
        q = self.linear(b, x, "q_proj", nq * d, h, a.bias, "q")
        k = self.linear(b, x, "k_proj", nkv * d, h, a.bias, "k")
        v = self.linear(b, x, "v_proj", nkv * d, h, a.bias, "v")
        if a.qk_norm and a.qk_norm_across_heads:  # over the whole projection, all heads at once (OLMoE)
            rms = NormConfig(NormType.RMS, norm.eps, norm.unit_offset)
            q = self.norm(b, q, "q_norm", "q_normed", rms, nq * d)
            k = self.norm(b, k, "k_norm", "k_normed", rms, nkv * d)
        if a.clip_qkv is not None:
            q, k, v = (b.op("clip", val, min=-a.clip_qkv, max=a.clip_qkv, name=f"{nm}_clipped")
                       for val, nm in ((q, "q"), (k, "k"), (v, "v")))
        heads = []
        for val, n, nm in ((q, nq, "q"), (k, nkv, "k"), (v, nkv, "v")):
            r = b.op("reshape", val, shape=[B, T, n, d], name=f"{nm}_heads")
            if a.qk_norm and not a.qk_norm_across_heads and nm != "v":  # each head's features (Qwen3, Gemma 3)
                r = self.norm(b, r, f"{nm}_norm", f"{nm}_normed", norm, d)  # the model's kind: Phi's is LayerNorm
            heads.append(b.op("transpose", r, perm=[0, 2, 1, 3], name=f"{nm}_t"))
        q, k, v = heads
        if a.rope is not None:
            rope = dict(dims=a.rope_dims, base=a.rope_theta, scaling=a.rope)
            q = b.op("rope", q, offset, name="q_rot", **rope)
            k = b.op("rope", k, offset, name="k_rot", **rope)
        o = b.op("attention", q, k, v, scale=a.scale, window=a.window, softcap=a.softcap, alibi=a.alibi, name="attn")
        o = b.op("transpose", o, perm=[0, 2, 1, 3], name="attn_t")
        o = b.op("reshape", o, shape=[B, T, nq * d], name="attn_flat")
        out = self.linear(b, o, "o_proj", h, nq * d, a.out_bias, "out")
        b.build(out)
        return fname

    def _gated(self, b: FunctionBuilder, x: Value, prefix: str, size: int, act: str, bias: bool) -> Value:
        h = self.spec.hidden_size
        p = f"{prefix}." if prefix else ""
        n = f"{prefix}_" if prefix else ""
        gate = self.linear(b, x, f"{p}gate_proj", size, h, bias, f"{n}gate")
        up = self.linear(b, x, f"{p}up_proj", size, h, bias, f"{n}up")
        hidden = b.op("mul", b.op(act, gate, name=f"{n}gate_act"), up, name=f"{n}hidden")
        return self.linear(b, hidden, f"{p}down_proj", h, size, bias, f"{n}out")

    def ffn(self, fname: str, f: FFNConfig) -> str:
        h, i = self.spec.hidden_size, f.intermediate_size
        b = FunctionBuilder(fname, self.program)
        x = b.input("x", self.t(B, T, h))
        act = f.activation.value
        if f.kind == FFNType.GATED:
            out = self._gated(b, x, "", i, act, f.bias)
        elif f.kind == FFNType.DENSE:
            up = self.linear(b, x, "up_proj", i, h, f.bias, "up")
            hidden = b.op(act, up, name="hidden")
            out = self.linear(b, hidden, "down_proj", h, i, f.bias, "out")
        elif not f.kind.builtin:  # a kind a plugin added (frontends/blocks: `ffn`)
            out = ffn_builder(f.kind)(self, b, x, f.settings, f)
        else:
            out = self.moe(b, x, f)
        b.build(out)
        return fname

    def moe(self, b: FunctionBuilder, x: Value, f: FFNConfig) -> Value:
        m, h = f.moe, self.spec.hidden_size
        e, i = m.num_experts, m.intermediate_size
        logits = self.linear(b, x, "router", e, h, m.router_bias, "router_logits")
        gate = b.param("experts.gate_proj.weight", self.t(e, i, h))
        up = b.param("experts.up_proj.weight", self.t(e, i, h))
        down = b.param("experts.down_proj.weight", self.t(e, h, i))
        out = b.op("moe", x, logits, gate, up, down, top_k=m.top_k, normalize=m.normalize,
                   activation=f.activation.value, weights_in_float32=m.weights_in_float32, name="experts_out")
        if m.shared_expert_intermediate_size is None:
            return out
        shared = self._gated(b, x, "shared_expert", m.shared_expert_intermediate_size, f.activation.value, False)
        if m.shared_expert_gate:
            g = self.linear(b, x, "shared_expert_gate", 1, h, False, "shared_gate_logit")
            shared = b.op("mul", b.op("sigmoid", g, name="shared_gate"), shared, name="shared_gated")
        return b.op("add", out, shared, name="out")

    def decoder_layer(self, fname: str, cfg: LayerConfig, mixer_fn: str, mixer_prefix: str,
                      ffn_fn: str | None) -> str:
        """Norms and residuals around the layer's mixer (attention, or a block from frontends/blocks/) and its FFN,
        if it has one."""
        size = self.spec.hidden_size
        b = FunctionBuilder(fname, self.program)
        wide = self._wide_residual()
        x = b.input("x", TensorType(DType.F32, (B, T, size)) if wide else self.t(B, T, size))
        offset = b.input("offset", OFFSET) if _uses_offset(cfg) else None
        h = self.norm(b, self._narrow(b, x, "x"), "input_norm", "h", cfg.norm, size)
        a = b.op("call", h, offset, callee=mixer_fn, prefix=mixer_prefix, name="attn")
        if ffn_fn is None:  # the mixer is the whole layer (Mamba, RNN stacks)
            if cfg.residual == Residual.SANDWICH:
                a = self.norm(b, a, "attn_out_norm", "attn_normed", cfg.norm, size)
            b.build(b.op("add", x, self._widen(b, a, "attn"), name="out"))
            return fname
        if cfg.residual == Residual.PARALLEL:  # one norm feeds both; both add to the same residual
            m = b.op("call", h, callee=ffn_fn, prefix="mlp", name="mlp")
            b.build(b.op("add", b.op("add", x, a, name="x_attn"), m, name="out"))
            return fname
        if cfg.residual == Residual.SANDWICH:
            a = self.norm(b, a, "attn_out_norm", "attn_normed", cfg.norm, size)
        x = b.op("add", x, self._widen(b, a, "attn"), name="x_attn")
        h = self.norm(b, self._narrow(b, x, "x_attn"), "post_attention_norm", "h_mlp", cfg.norm, size)
        m = b.op("call", h, callee=ffn_fn, prefix="mlp", name="mlp")
        if cfg.residual == Residual.SANDWICH:
            m = self.norm(b, m, "ffn_out_norm", "mlp_normed", cfg.norm, size)
        b.build(b.op("add", x, self._widen(b, m, "mlp"), name="out"))
        return fname

    def _wide_residual(self) -> bool:
        """Whether the residual stream is float32 while the layers compute in a narrower dtype (Mamba)."""
        return self.spec.residual_in_fp32 and self.dtype != DType.F32

    def _narrow(self, b: FunctionBuilder, x: Value, name: str) -> Value:
        """The float32 residual as a layer reads it: cast to the compute dtype (transformers' `.to(norm dtype)`)."""
        return b.op("cast", x, dtype=self.dtype, name=f"{name}_in") if self._wide_residual() else x

    def _widen(self, b: FunctionBuilder, x: Value, name: str) -> Value:
        return b.op("cast", x, dtype=DType.F32, name=f"{name}_f32") if self._wide_residual() else x

    def mixer(self, configs: list[LayerConfig]) -> dict[LayerConfig, tuple[str, str]]:
        """Build each distinct mixer once: (function name, parameter prefix) per layer configuration."""
        attn_fns = _names("attention", [c.attention for c in configs if c.attention is not None], lambda a: a.window)
        others = [(c.block, c.mixer) for c in configs if c.attention is None]
        other_fns = _names("mixer", others, lambda key: key[0].value)
        out, made = {}, set()
        for c in configs:
            if c.attention is not None:
                name, prefix = attn_fns[c.attention], "attn"
                if name not in made:
                    self.attention(name, c.attention, c.norm)
            else:
                kind = builder(c.block)
                name, prefix = other_fns[(c.block, c.mixer)], kind.prefix
                if len(set(others)) == 1:
                    name = c.block.value  # one kind of mixer: named after it (`@mamba`)
                if name not in made:
                    kind.build(self, name, c.mixer, c)
            made.add(name)
            out[c] = (name, prefix)
        return out

    # ------------------------------------------------------------------------------------------------ the model

    def lower(self) -> Program:
        s = self.spec
        configs = [s.layer(i) for i in range(s.num_layers)]
        mixers = self.mixer(configs)
        ffn_fns = _names("mlp", [c.ffn for c in configs if c.ffn is not None], lambda f: f.kind.value)
        layer_fns = _names("decoder_layer", configs,
                           lambda c: c.attention.window if c.attention is not None else c.block.value)
        made: set[str] = set()
        for c in configs:
            ffn, layer = ffn_fns[c.ffn] if c.ffn is not None else None, layer_fns[c]
            if ffn is not None and ffn not in made:
                self.ffn(ffn, c.ffn)
            if layer not in made:
                self.decoder_layer(layer, c, *mixers[c], ffn)
            made |= {ffn, layer}

        b = FunctionBuilder("main", self.program)
        ids = b.input("input_ids", TensorType(DType.I32, (B, T)))
        offset = b.input("offset", OFFSET)  # where this call's tokens start: positions offset .. offset + T - 1
        table = b.param("embed_tokens.weight", self.t(s.vocab_size, s.hidden_size))
        h = b.op("embed", ids, table, name="h")
        if s.embedding_multiplier is not None:
            h = b.op("scale", h, factor=s.embedding_multiplier, name="h_scaled")
        h = self.positions(b, h, ids, offset)
        if s.embedding_norm:  # BLOOM's word_embeddings_layernorm
            h = self.norm(b, h, "embed_norm", "h_normed", _model_norm(s), s.hidden_size)
        h = self._widen(b, h, "h")
        for i, c in enumerate(configs):
            positions = offset if _uses_offset(c) else None
            h = b.op("call", h, positions, callee=layer_fns[c], prefix=f"layers.{i}", name="h")
        if s.head.kind == HeadKind.CAUSAL_LM:  # the head is per position: keep only the positions asked for
            h = b.op("keep_last", h, b.input(Program.LOGITS_TO_KEEP, TensorType(DType.I32, ())), name="h_kept")
        if self._wide_residual():  # the float32 stream normalized in float32, its weight widened (exactly)
            w = b.derive("cast", b.param("norm.weight", self.t(s.hidden_size)), dtype=DType.F32, name="norm.weight_f32")
            h = b.op("rms_norm", h, w, eps=s.norm_eps, name="h_final_f32")
            h = b.op("cast", h, dtype=self.dtype, name="h_final")
        else:
            h = self.norm(b, h, "norm", "h_final", configs[0].norm if configs else _model_norm(s), s.hidden_size)
        b.build(self.head(b, h, ids, table))
        # callees first, entry last: reads top-down like a source file
        self.program.functions.sort(key=lambda f: f.name == "main")
        return verify(self.program)

    def positions(self, b: FunctionBuilder, h: Value, ids: Value, offset: Value) -> Value:
        """Absolute positions added to the embeddings, at the call's positions offset .. offset + T - 1."""
        s = self.spec
        if s.position == PositionEmbedding.LEARNED:
            table = b.param("embed_positions.weight", self.t(s.max_position_embeddings, s.hidden_size))
            pos = b.op("learned_positions", ids, table, offset, name="positions")
        elif s.position == PositionEmbedding.SINUSOIDAL:
            pos = b.op("sinusoidal_positions", ids, offset, dims=s.hidden_size, dtype=self.dtype, name="positions")
        else:
            return h
        return b.op("add", h, pos, name="h_positioned")

    def head(self, b: FunctionBuilder, h: Value, ids: Value, table: Value) -> Value:
        """The LM head, or a classifier. A sequence classifier pools before projecting: transformers scores every
        token and then picks one row, which is the same numbers for a linear layer at 1/T of the work, and is what
        an MLP classifier over a pooled vector means."""
        s, head = self.spec, self.spec.head
        if head.kind == HeadKind.CAUSAL_LM:
            weight = table if s.tie_word_embeddings else b.param("lm_head.weight", self.t(s.vocab_size, s.hidden_size))
            bias = b.param("lm_head.bias", self.t(s.vocab_size)) if s.lm_head_bias else None
            logits = b.op("linear", h, weight, bias, name="logits")
            if s.final_logit_softcap is not None:
                logits = b.op("softcap", logits, cap=s.final_logit_softcap, name="logits_capped")
            return logits
        if head.kind == HeadKind.SEQUENCE_CLASSIFICATION:
            h = b.op("pool", h, ids, mode=head.pooling.value, pad_token_id=s.pad_token_id, name="pooled")
        if head.classifier_hidden_size is not None:
            hid = self.linear(b, h, "classifier.dense", head.classifier_hidden_size, s.hidden_size, True, "cls_hidden")
            h = b.op(head.classifier_activation.value, hid, name="cls_act")
            return self.linear(b, h, "classifier.out_proj", head.num_labels, head.classifier_hidden_size, True,
                               "logits")
        return self.linear(b, h, "score", head.num_labels, s.hidden_size, head.bias, "logits")


def _uses_offset(cfg: LayerConfig) -> bool:
    """Only rotary attention needs the position: state-space and recurrent mixers are position-free."""
    return cfg.attention is not None and cfg.attention.rope is not None


def _model_norm(spec: ModelSpec) -> NormConfig:
    return NormConfig(spec.norm, spec.norm_eps, spec.norm_unit_offset, spec.norm_bias)


def _names(base: str, configs: list, distinguish) -> dict:
    """One function name per distinct configuration: `base` alone, `base_local` / `base_global` when two kinds differ
    by sliding window (or `base_<kind>` by the given feature), else numbered."""
    distinct = list(dict.fromkeys(configs))
    if len(distinct) == 1:
        return {distinct[0]: base}
    keys = [distinguish(c) for c in distinct]
    if len(keys) == 2 and sum(k is None for k in keys) == 1 and all(k is None or isinstance(k, int) for k in keys):
        return {c: base + ("_global" if k is None else "_local") for c, k in zip(distinct, keys)}
    if len(set(keys)) == len(keys) and all(isinstance(k, str) for k in keys):
        return {c: f"{base}_{k}" for c, k in zip(distinct, keys)}
    return {c: f"{base}_{i}" for i, c in enumerate(distinct)}


def lower(spec: ModelSpec, dtype: DType | str = DType.F32) -> Program:
    """The IR program for `spec`, with every parameter and activation in `dtype`."""
    return _Lowering(spec, DType.parse(dtype) if isinstance(dtype, str) else dtype).lower()
