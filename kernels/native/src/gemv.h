// y = x @ W.T (+ bias) for a few activation rows and float weights (mlxc.kernels.native.linear): a decode step's float
// matmuls read every weight once, so they run at the memory's speed only if nothing else gets in the way. MLX's CPU
// matmul sends [1, K] x [K, N] through BLAS sgemm; this reads R rows of W side by side (each with its own
// accumulators, so the loads stay sequential and the FMA chains independent), for up to 4 rows of x per pass over W.
// The kernel is written once (gemv_kernel.inc) and compiled per instruction set (gemv_avx2.cpp, gemv_avx512.cpp,
// and the portable copy in gemv.cpp); the ISA is the one the other kernels run (dispatch.h).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace mlxc_native {

// Multiple of 16 floats: activation rows are copied with this padding (zeros), so their loads never need a mask.
constexpr int kGemvPad = 16;

struct GemvArgs {
  const void* w;       // N rows of K elements of wtype, row n at w + n * ldw elements
  FloatType wtype;
  int64_t ldw;
  const float* x;      // M rows of K floats, row m at x + m * ldx; ldx a multiple of kGemvPad, zeros past K
  int64_t ldx;
  const float* bias;   // N floats, or null
  float* y;            // M x N, row m at y + m * ldy
  int64_t ldy;
  int64_t M, N, K;
};

// Columns [n0, n1) of y (rows n0 .. n1 - 1 of W) for all M rows of x.
using GemvFn = void (*)(const GemvArgs& a, int64_t n0, int64_t n1);
constexpr int64_t kGemvRowAlign = 8;  // the parallel split's chunks are whole multiples of 8 rows of W

namespace scalar { void gemv_rows(const GemvArgs& a, int64_t n0, int64_t n1); }
#if MLXC_HAVE_X86
namespace avx2 { void gemv_rows(const GemvArgs& a, int64_t n0, int64_t n1); }
namespace avx512 { void gemv_rows(const GemvArgs& a, int64_t n0, int64_t n1); }
#endif

}  // namespace mlxc_native

#ifndef MLXC_GEMV_KERNEL_ONLY
#include <optional>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlxc_native {

namespace mx = mlx::core;

// x @ w.T (+ bias): w [N, K] float32, float16 or bfloat16; x [..., K] of w's dtype; bias [N] of that dtype or none;
// the result [..., N] in that dtype, accumulated in float32. Any strides. Meant for few rows of x (a decode step);
// correct for any number.
mx::array linear(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                 mx::StreamOrDevice s = {});

class LinearPrim : public mx::UnaryPrimitive {
 public:
  explicit LinearPrim(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcLinear"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace mlxc_native
#endif
