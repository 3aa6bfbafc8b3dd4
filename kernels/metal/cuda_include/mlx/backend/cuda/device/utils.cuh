// Stand-in for MLX's mlx/backend/cuda/device/utils.cuh, used by kernels/cuda_check.py only when MLX's own CUDA
// headers are not at hand (set MLXC_MLX_SOURCE to an MLX checkout to compile against the real ones). It declares
// what MLX's generated signatures and mlxc's twins use: the fp16/bf16 types and Shape/Strides as MLX defines them
// (fixed-size arrays of MAX_NDIM = 10, passed by value as __grid_constant__ parameters).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/cstdint>

#define MAX_NDIM 10
#define WARP_SIZE 32

namespace mlx::core::cu {

using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;

}  // namespace mlx::core::cu
