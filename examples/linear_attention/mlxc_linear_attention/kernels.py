"""The MLX math of causal linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"), in functions that
use only `mx`: mlxc carries their source verbatim into every generated module that runs the op (`helper` in
ops.py), and the tests call them directly against a NumPy reference.

With the feature map phi(x) = elu(x) + 1 (positive, so the normalizer never vanishes), position t attends to
positions u <= t as

    out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),   S_t = sum_u phi(k_u) v_u^T  [D, E],   z_t = sum_u phi(k_u)  [D]

S and z are the recurrent state: a decode step adds one outer product and reads it back in O(D E), whatever the
context length. A prefill computes the same sums in parallel, block by block (quadratic inside a block of
`chunk_size` positions, recurrent across blocks); every intermediate is float32.
"""

import mlx.core as mx


def linear_attention_features(x):
    """phi(x) = elu(x) + 1: x + 1 above zero, exp(x) below."""
    return mx.where(x > 0, x + 1.0, mx.exp(mx.minimum(x, 0.0)))


def linear_attention_block(q, k, v, s, z, eps):
    """One block of positions in parallel, continuing from the sums s [B, H, D, E] and z [B, H, D] of the positions
    before it; q and k are feature-mapped, everything float32. Returns (out [B, H, T, E], s, z) after the block."""
    t = q.shape[2]
    scores = (q @ k.swapaxes(-1, -2)) * mx.tril(mx.ones((t, t), dtype=q.dtype))  # [B, H, T, T], causal
    num = scores @ v + q @ s
    den = scores.sum(axis=-1) + (q @ z[..., None])[..., 0]
    out = num / (den[..., None] + eps)
    return out, s + k.swapaxes(-1, -2) @ v, z + k.sum(axis=2)


def linear_attention_step(q, k, v, s, z, eps):
    """One position (the recurrent form): q, k [B, H, D] feature-mapped, v [B, H, E]. Returns (out, s, z)."""
    s = s + k[..., :, None] * v[..., None, :]
    z = z + k
    num = (q[..., None, :] @ s)[..., 0, :]
    den = (q * z).sum(axis=-1)
    return num / (den[..., None] + eps), s, z


def linear_attention(q, k, v, state, eps=1e-6, chunk_size=None):
    """Causal linear attention of q, k [B, H, T, D] and v [B, H, T, E] after what `state` (an ArrayState, or None
    without a cache) holds; returns [B, H, T, E] in q's dtype and leaves (S, z) in the state. One position runs the
    recurrent step; more run in blocks of `chunk_size` (all at once when None)."""
    b, h, t, d = q.shape
    e = v.shape[-1]
    prev = None if state is None else state.arrays
    s, z = prev if prev is not None else (mx.zeros((b, h, d, e), mx.float32), mx.zeros((b, h, d), mx.float32))
    fq = linear_attention_features(q.astype(mx.float32))
    fk = linear_attention_features(k.astype(mx.float32))
    fv = v.astype(mx.float32)
    if t == 1:
        out, s, z = linear_attention_step(fq[:, :, 0], fk[:, :, 0], fv[:, :, 0], s, z, eps)
        out = out[:, :, None]
    else:
        step = chunk_size or t
        parts = []
        for i in range(0, t, step):
            o, s, z = linear_attention_block(fq[:, :, i:i + step], fk[:, :, i:i + step], fv[:, :, i:i + step], s, z,
                                             eps)
            parts.append(o)
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
    if state is not None:
        state.update(s, z)
    return out.astype(q.dtype)
