#include "gemv.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "parallel.h"
#include "prim.h"

// The portable kernel: the same source with the compiler's default flags.
#define MLXC_GEMV_NS scalar
#include "gemv_kernel.inc"
#undef MLXC_GEMV_NS

namespace mlxc_native {
namespace {

constexpr const char* kOp = "mlxc.linear";

std::string dtype_str(mx::Dtype t) {
  return t == mx::float32 ? "float32" : t == mx::float16 ? "float16" : t == mx::bfloat16 ? "bfloat16" : "non-float";
}

// The kernel of the instruction set the other kernels run (set_isa / MLXC_NATIVE_ISA choose it for tests too).
GemvFn gemv_kernel() {
#if MLXC_HAVE_X86
  const std::string isa = active_kernels().name;
  if (isa.rfind("avx512", 0) == 0) return avx512::gemv_rows;
  if (isa == "avx2") return avx2::gemv_rows;
#endif
  return scalar::gemv_rows;
}

// A float array of any strides as float rows of K (rows `ld` apart): count = rows * K elements in row-major order.
template <typename T>
void gather_float(const mx::array& a, float* dst, int64_t count, int64_t ld, int64_t K) {
  const T* src = a.data<T>();
  if (a.flags().row_contiguous) {
    for (int64_t m = 0; m < count / K; ++m)
      for (int64_t k = 0; k < K; ++k) dst[m * ld + k] = static_cast<float>(src[m * K + k]);
    return;
  }
  for (int64_t i = 0; i < count; ++i)
    dst[i / K * ld + i % K] = static_cast<float>(src[mx::elem_to_loc(static_cast<int>(i), a.shape(), a.strides())]);
}

void gather_any(const mx::array& a, float* dst, int64_t count, int64_t ld, int64_t K) {
  if (a.dtype() == mx::float32) gather_float<float>(a, dst, count, ld, K);
  else if (a.dtype() == mx::float16) gather_float<mx::float16_t>(a, dst, count, ld, K);
  else gather_float<mx::bfloat16_t>(a, dst, count, ld, K);
}

struct Scratch {
  std::vector<float> x, bias, y;
};

void run_linear(const mx::array& x, const mx::array& w, const mx::array* bias, mx::array& out) {
  const int64_t N = w.shape(0), K = w.shape(1);
  int64_t M = 1;
  for (int i = 0; i + 1 < x.ndim(); ++i) M *= x.shape(i);
  if (M == 0 || N == 0) return;
  thread_local Scratch t;

  // x as float rows padded with zeros to a multiple of kGemvPad (small: M x K)
  const int64_t ldx = (K + kGemvPad - 1) / kGemvPad * kGemvPad;
  t.x.assign(static_cast<size_t>(M * ldx), 0.0f);
  if (K > 0) gather_any(x, t.x.data(), M * K, ldx, K);

  // W: its own buffer when each row is contiguous (any row stride), else a row-major copy
  const size_t item = w.itemsize();
  const void* wp = w.data<char>();
  int64_t ldw = K;
  std::vector<char> wcopy;
  if (w.flags().row_contiguous) {
  } else if (K <= 1 || w.strides(1) == 1) {
    ldw = w.strides(0);
  } else {
    wcopy.resize(static_cast<size_t>(N * K) * item);
    const char* src = w.data<char>();
    const int64_t s0 = w.strides(0), s1 = w.strides(1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(wcopy.data() + (n * K + k) * item, src + (n * s0 + k * s1) * static_cast<int64_t>(item), item);
    wp = wcopy.data();
  }

  const float* bp = nullptr;
  if (bias != nullptr) {
    t.bias.resize(static_cast<size_t>(N));
    gather_any(*bias, t.bias.data(), N, N, N);
    bp = t.bias.data();
  }

  float* y = out.dtype() == mx::float32 ? out.data<float>() : (t.y.resize(static_cast<size_t>(M * N)), t.y.data());
  const GemvArgs a{wp, float_type(w.dtype()), ldw, t.x.data(), ldx, bp, y, N, M, N, K};
  const GemvFn fn = gemv_kernel();
  const Tuning& tu = tuning();
  const int threads = get_threads();
  // Waking the helper thread costs tens of microseconds: small products stay on the stream thread.
  if (threads > 1 && static_cast<double>(M) * N * K >= tu.parallel_min_work) {
    // about chunks_per_thread chunks per thread, whole row groups each
    const int64_t target = static_cast<int64_t>(threads) * std::max(1, tu.chunks_per_thread);
    int64_t rows = (N + target - 1) / target;
    rows = std::max(kGemvRowAlign, (rows + kGemvRowAlign - 1) / kGemvRowAlign * kGemvRowAlign);
    const int64_t nchunks = (N + rows - 1) / rows;
    parallel_for(nchunks, threads, [&](int64_t c) { fn(a, c * rows, std::min(N, (c + 1) * rows)); });
  } else {
    fn(a, 0, N);
  }

  if (out.dtype() == mx::float16) {
    auto* o = out.data<mx::float16_t>();
    for (int64_t i = 0; i < M * N; ++i) o[i] = static_cast<mx::float16_t>(y[i]);
  } else if (out.dtype() == mx::bfloat16) {
    auto* o = out.data<mx::bfloat16_t>();
    for (int64_t i = 0; i < M * N; ++i) o[i] = static_cast<mx::bfloat16_t>(y[i]);
  }
}

// MLX's own composition: the primitive's gradient (and the tests' reference for it).
std::vector<mx::array> reference(const std::vector<mx::array>& in, mx::Stream st) {
  mx::array y = mx::matmul(in[0], mx::transpose(in[1], st), st);
  if (in.size() > 2) y = mx::add(y, in[2], st);
  return {y};
}

}  // namespace

mx::array linear(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias, mx::StreamOrDevice s) {
  if (w.ndim() != 2) fail(kOp, "w must be a 2-D [N, K] array, got shape " + shape_str(w.shape()));
  if (!is_float(w.dtype())) fail(kOp, "w must be float32, float16 or bfloat16, got " + dtype_str(w.dtype()));
  const int N = w.shape(0), K = w.shape(1);
  if (x.ndim() < 1 || x.shape(-1) != K)
    fail(kOp, "x " + shape_str(x.shape()) + " must end in K = " + std::to_string(K) + " to multiply w of shape " +
         shape_str(w.shape()));
  if (x.dtype() != w.dtype())
    fail(kOp, "x (" + dtype_str(x.dtype()) + ") and w (" + dtype_str(w.dtype()) + ") must have the same dtype");
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != N)
      fail(kOp, "bias must have shape (" + std::to_string(N) + ",) (w's rows), got " + shape_str(bias->shape()));
    if (bias->dtype() != w.dtype())
      fail(kOp, "bias (" + dtype_str(bias->dtype()) + ") must have w's dtype (" + dtype_str(w.dtype()) + ")");
  }
  const mx::Stream st = cpu_stream(s);
  mx::Shape shape = x.shape();
  shape.back() = N;
  std::vector<mx::array> inputs{x, w};
  if (bias) inputs.push_back(*bias);
  return mx::array(std::move(shape), x.dtype(), std::make_shared<LinearPrim>(st), std::move(inputs));
}

void LinearPrim::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare_output(out, inputs, stream());
  std::vector<mx::array> in;
  for (const auto& a : inputs) in.push_back(mx::array::unsafe_weak_copy(a));
  mx::cpu::get_command_encoder(stream()).dispatch([in = std::move(in), out = mx::array::unsafe_weak_copy(out)]() mutable {
    run_linear(in[0], in[1], in.size() > 2 ? &in[2] : nullptr, out);
  });
}

void LinearPrim::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcLinear] has no GPU implementation");
}

std::vector<mx::Shape> LinearPrim::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

std::vector<mx::array> LinearPrim::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                       const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const mx::Stream st = stream();
  return reference_vjp([st](const std::vector<mx::array>& in) { return reference(in, st); }, primals, cotangents,
                       argnums);
}

}  // namespace mlxc_native
