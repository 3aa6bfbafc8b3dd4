"""The `linear_attention` op: declared once (operands, attributes, type rule, state) and implemented once in MLX,
with the same machinery mlxc's own ops use, so it prints, parses, verifies, dumps and compiles like a built-in."""

from mlxc.plugins import AttrDef, OpGroup, State, StateKind, helper, implements, op, require

from . import kernels


@op("linear_attention", OpGroup.SCAN, ("q", "k", "v"),
    (AttrDef("eps", float, 1e-6), AttrDef("chunk_size", int, None, optional=True)),
    state=lambda attrs, *types: (State(StateKind.RECURRENT),))
def _linear_attention(q, k, v, eps, chunk_size):
    """Causal linear attention with the feature map elu(x) + 1 (Katharopoulos et al. 2020) of q, k [B, H, T, D] and
    v [B, H, T, E]; result [B, H, T, E]. Its recurrent state keeps the sums S [B, H, D, E] and z [B, H, D], so a
    decode step costs the same at any context length; a prefill runs in blocks of `chunk_size` (none: one block)."""
    require(q.rank == k.rank == v.rank == 4, f"linear_attention expects [B, heads, T, dim] operands, got {q}, {k}, {v}")
    require(q.shape == k.shape, f"q {q} and k {k} must have one shape")
    require(v.shape[:3] == q.shape[:3], f"v {v} does not match q {q} in batch, heads and positions")
    require(q.dtype == k.dtype == v.dtype, f"q, k and v must share a dtype, got {q}, {k}, {v}")
    require(eps > 0, f"eps must be positive, got {eps}")
    require(chunk_size is None or chunk_size > 0, f"chunk_size must be positive, got {chunk_size}")
    return q.with_shape(q.shape[:3] + (v.shape[3],))


helper("linear_attention", kernels.linear_attention_features, kernels.linear_attention_block,
       kernels.linear_attention_step, kernels.linear_attention)


@implements("linear_attention", helpers=("linear_attention",))
def _fragment(a, k, t):
    """q, k, v, then the op's state object (a stateful op gets it after its operands)."""
    chunk = f", chunk_size={k['chunk_size']}" if k["chunk_size"] is not None else ""
    return f"linear_attention({a[0]}, {a[1]}, {a[2]}, {a[3]}, eps={k['eps']!r}{chunk})"
