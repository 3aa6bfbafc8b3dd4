// mlxc kernel helpers (the `header` of every mlxc Metal kernel)

// torch.nn.functional.softplus (beta 1, threshold 20), as transformers' Mamba applies it to dt
inline float mlxc_softplus(float x) {
  return x > 20.0f ? x : log1p(metal::exp(x));
}

inline float mlxc_silu(float x) {
  return x / (1.0f + metal::exp(-x));
}

// Sum over the W lanes (a power of two dividing 32) that share one row: simd_sum for a whole SIMD-group,
// a butterfly of simd_shuffle_xor for W < 32. Every lane of the SIMD-group must call it.
template <int W>
inline float mlxc_lane_sum(float v) {
  if (W == 32) {
    return simd_sum(v);
  }
  for (ushort o = W / 2; o > 0; o /= 2) {
    v += simd_shuffle_xor(v, o);
  }
  return v;
}

