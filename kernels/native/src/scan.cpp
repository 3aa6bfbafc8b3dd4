#include "scan.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "parallel.h"
#include "prim.h"

// The portable kernel: the same source with the compiler's default flags.
#define MLXC_SCAN_NS scalar
#include "scan_kernel.inc"
#undef MLXC_SCAN_NS

namespace mlxc_native {
namespace {

constexpr const char* kOp = "mlxc.selective_scan";

using ScanFn = void (*)(const ScanArgs&, int64_t, int64_t);

// The kernel of the instruction set the other kernels run (set_isa / MLXC_NATIVE_ISA choose it for tests too).
ScanFn scan_kernel() {
#if MLXC_HAVE_X86
  const std::string isa = active_kernels().name;
  if (isa.rfind("avx512", 0) == 0) return avx512::scan_lanes;
  if (isa == "avx2") return avx2::scan_lanes;
#endif
  return scalar::scan_lanes;
}

}  // namespace

std::vector<mx::array> selective_scan(const mx::array& u, const mx::array& delta, const mx::array& A,
                                      const mx::array& B, const mx::array& C, const mx::array& D,
                                      const mx::array& dt_bias, const std::optional<mx::array>& z,
                                      const std::optional<mx::array>& h0, mx::StreamOrDevice s) {
  const mx::Stream st = cpu_stream(s);
  if (u.ndim() != 3 || A.ndim() != 2) fail(kOp, "expects u [B, T, Dm] and A [Dm, N]");
  const int b = u.shape(0), T = u.shape(1), dm = u.shape(2), n = A.shape(1);
  if (A.shape(0) != dm) fail(kOp, "A must be [Dm, N] with Dm = u.shape[2]");
  if (n < 1 || n > kScanMaxStates) fail(kOp, "N (A.shape[1]) must be between 1 and " + std::to_string(kScanMaxStates));
  if (delta.shape() != u.shape() || (z && z->shape() != u.shape())) fail(kOp, "delta and z must have u's shape");
  const mx::Shape bc{b, T, n};
  if (B.shape() != bc || C.shape() != bc) fail(kOp, "B and C must be [B, T, N]");
  if (D.shape() != mx::Shape{dm} || dt_bias.shape() != mx::Shape{dm}) fail(kOp, "D and dt_bias must be [Dm]");
  const mx::Shape hs{b, dm, n};
  if (h0 && h0->shape() != hs) fail(kOp, "h0 must be [B, Dm, N]");
  for (const mx::array* a : {&u, &delta, &A, &B, &C, &D, &dt_bias})
    if (!is_float(a->dtype())) fail(kOp, "inputs must be float32, float16 or bfloat16");
  if ((z && !is_float(z->dtype())) || (h0 && !is_float(h0->dtype())))
    fail(kOp, "inputs must be float32, float16 or bfloat16");
  auto f32 = [&](const mx::array& a) { return mx::contiguous(mx::astype(a, mx::float32, st), false, st); };
  std::vector<mx::array> in{f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), f32(dt_bias),
                            h0 ? f32(*h0) : mx::zeros(hs, mx::float32, st)};
  if (z) in.push_back(f32(*z));
  return mx::array::make_arrays({u.shape(), hs}, {mx::float32, mx::float32},
                                std::make_shared<SelectiveScanPrim>(st, z.has_value()), in);
}

std::vector<mx::Shape> SelectiveScanPrim::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape(), inputs[7].shape()};
}

void SelectiveScanPrim::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  for (const auto& a : inputs) {
    if (!a.flags().row_contiguous) throw std::runtime_error("[MlxcSelectiveScan] inputs must be row-contiguous");
    enc.set_input_array(a);
  }
  for (auto& o : outputs) enc.set_output_array(o);
  std::vector<mx::array> in;
  for (const auto& a : inputs) in.push_back(mx::array::unsafe_weak_copy(a));
  enc.dispatch([in = std::move(in), y = mx::array::unsafe_weak_copy(outputs[0]),
                h = mx::array::unsafe_weak_copy(outputs[1]), has_z = has_z_]() mutable {
    ScanArgs a{in[0].data<float>(), in[1].data<float>(), has_z ? in[8].data<float>() : nullptr,
               in[2].data<float>(), in[3].data<float>(), in[4].data<float>(), in[5].data<float>(),
               in[6].data<float>(), in[7].data<float>(), y.data<float>(), h.data<float>(),
               in[0].shape(1), in[0].shape(2), in[2].shape(1)};
    const int64_t groups = (a.Dm + kScanLanes - 1) / kScanLanes, batch = in[0].shape(0);
    const ScanFn kernel = scan_kernel();
    // one chunk per (batch, 16 channels): T steps of N vector exps each. A decode step (~25k state updates for
    // Mamba-130M, a few microseconds) stays on the stream thread: waking a helper costs more than it saves.
    const int threads = batch * a.T * a.Dm * a.N < (int64_t{1} << 18) ? 1 : get_threads();
    parallel_for(batch * groups, threads, [&](int64_t c) { kernel(a, c / groups, (c % groups) * kScanLanes); });
  });
}

void SelectiveScanPrim::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[MlxcSelectiveScan] has no GPU implementation");
}

}  // namespace mlxc_native
