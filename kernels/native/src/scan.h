// Mamba's selective scan as one MLX primitive on the CPU (mlxc.kernels.native.selective_scan): per batch and channel
// the sequential recurrence in float32, 16 channels per vector, channel groups spread over the extension's threads.
// Sequential in time is O(T * Dm * N) like the recurrence itself, so it needs none of the chunked scan's extra work.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace mlxc_native {

constexpr int kScanLanes = 16;         // channels per vector
constexpr int kScanMaxStates = 256;    // N (d_state) at most

// Row-contiguous float32 views: u, delta, z [B, T, Dm]; A [Dm, N]; B, C [B, T, N]; D, dt_bias [Dm]; h0 [B, Dm, N];
// outputs y [B, T, Dm] and h [B, Dm, N]. z may be null.
struct ScanArgs {
  const float *u, *delta, *z, *A, *B, *C, *D, *dt_bias, *h0;
  float *y, *h;
  int64_t T, Dm, N;
};

// Channels [d0, d0 + 16) (fewer at the end) of batch b, for each instruction set.
namespace scalar { void scan_lanes(const ScanArgs& a, int64_t b, int64_t d0); }
#if MLXC_HAVE_X86
namespace avx2 { void scan_lanes(const ScanArgs& a, int64_t b, int64_t d0); }
namespace avx512 { void scan_lanes(const ScanArgs& a, int64_t b, int64_t d0); }
#endif

}  // namespace mlxc_native

#ifndef MLXC_SCAN_KERNEL_ONLY
#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlxc_native {

namespace mx = mlx::core;

// (y [B, T, Dm], h [B, Dm, N]) in float32: dt_t = softplus(delta_t + dt_bias), h_t = exp(dt_t A) h_{t-1} +
// dt_t u_t B_t, y_t = h_t . C_t + D u_t, times silu(z_t) when z is given; h0 the state before (zeros when absent).
// Inputs float32, float16 or bfloat16, any strides (converted to contiguous float32 first).
std::vector<mx::array> selective_scan(const mx::array& u, const mx::array& delta, const mx::array& A,
                                      const mx::array& B, const mx::array& C, const mx::array& D,
                                      const mx::array& dt_bias, const std::optional<mx::array>& z,
                                      const std::optional<mx::array>& h0, mx::StreamOrDevice s = {});

class SelectiveScanPrim : public mx::Primitive {
 public:
  SelectiveScanPrim(mx::Stream stream, bool has_z) : mx::Primitive(stream), has_z_(has_z) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcSelectiveScan"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return has_z_ == static_cast<const SelectiveScanPrim&>(other).has_z_;
  }

 private:
  bool has_z_;
};

}  // namespace mlxc_native
#endif
