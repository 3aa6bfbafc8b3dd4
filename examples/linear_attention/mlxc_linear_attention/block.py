"""The `linear_attention` block kind: a layer mixer a spec file can use per layer, with its settings under its name
(`linear_attention: {num_heads: 4}`), next to standard attention in a `layer_pattern`."""

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from mlxc.plugins import FunctionBuilder, mixer


class LinearAttentionSpec(BaseModel):
    """q, k, v projections to `num_heads` heads of `head_dim` features (default hidden_size / num_heads), causal
    linear attention, and an output projection back to the hidden size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_heads: int = Field(gt=0)
    head_dim: Optional[int] = Field(None, gt=0)
    bias: bool = False
    eps: float = Field(1e-6, gt=0)
    chunk_size: Optional[int] = Field(None, gt=0)


@mixer("linear_attention", prefix="linear_attn", settings=LinearAttentionSpec)
def build(lo, fname: str, s: LinearAttentionSpec, cfg) -> None:
    hidden = lo.spec.hidden_size
    n = s.num_heads
    if s.head_dim is None and hidden % n:
        raise ValueError(f"linear_attention: hidden_size {hidden} is not divisible by {n} heads; set head_dim")
    d = s.head_dim or hidden // n
    b = FunctionBuilder(fname, lo.program)
    x = b.input("x", lo.t("B", "T", hidden))
    heads = []
    for proj in ("q", "k", "v"):
        y = lo.linear(b, x, f"{proj}_proj", n * d, hidden, s.bias, proj)
        y = b.op("reshape", y, shape=["B", "T", n, d], name=f"{proj}_heads")
        heads.append(b.op("transpose", y, perm=[0, 2, 1, 3], name=f"{proj}_t"))
    o = b.op("linear_attention", *heads, eps=s.eps, chunk_size=s.chunk_size, name="mixed")
    o = b.op("transpose", o, perm=[0, 2, 1, 3], name="mixed_t")
    o = b.op("reshape", o, shape=["B", "T", n * d], name="mixed_flat")
    b.build(lo.linear(b, o, "o_proj", hidden, n * d, s.bias, "out"))
