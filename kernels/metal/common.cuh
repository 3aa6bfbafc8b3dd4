// mlxc kernel helpers (the `header` of every mlxc CUDA twin); guarded so several twins can share one file
#ifndef MLXC_COMMON_CUH
#define MLXC_COMMON_CUH

__device__ inline float mlxc_softplus(float x) {
  return x > 20.0f ? x : log1pf(expf(x));
}

__device__ inline float mlxc_silu(float x) {
  return x / (1.0f + expf(-x));
}

// The lanes of this thread's warp that exist: MLX launches blocks of min(threadgroup, grid), which need not be a
// multiple of 32.
__device__ inline unsigned mlxc_warp_mask() {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned total = blockDim.x * blockDim.y * blockDim.z;
  const unsigned n = min(32u, total - (tid & ~31u));
  return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// Sum over the W lanes (a power of two dividing 32) that share one row.
template <int W>
__device__ inline float mlxc_lane_sum(float v) {
  const unsigned mask = mlxc_warp_mask();
  for (int o = W / 2; o > 0; o /= 2) {
    v += __shfl_xor_sync(mask, v, o);
  }
  return v;
}

__device__ inline float mlxc_warp_sum(float v) {
  const unsigned mask = mlxc_warp_mask();
  for (int o = 16; o > 0; o /= 2) {
    v += __shfl_xor_sync(mask, v, o);
  }
  return v;
}

#endif  // MLXC_COMMON_CUH
