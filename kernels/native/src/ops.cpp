#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "parallel.h"
#include "prim.h"

namespace mlxc_native {
namespace {

// Validates MLX's affine layout; returns K (the unpacked row length). group16: also accept 8-bit codes in groups of
// 16 (GGUF Q6_K's layout), which the lookups take and the unpacked matmul kernels (a scale per 32-block) do not.
int check_layout(const char* op, const mx::array& codes, const mx::array& scales, const mx::array& biases, int bits,
                 int group_size, bool group16 = false) {
  if (bits != 4 && bits != 8) fail(op, "bits must be 4 or 8, got " + std::to_string(bits));
  if (group16 && group_size == 16 && bits != 8) fail(op, "group_size 16 needs 8-bit codes");
  if (group_size != 32 && group_size != 64 && group_size != 128 && !(group16 && group_size == 16))
    fail(op, std::string("group_size must be ") + (group16 ? "16 (8-bit), " : "") + "32, 64 or 128, got " +
                 std::to_string(group_size));
  if (codes.dtype() != mx::uint32 || codes.ndim() != 2) fail(op, "codes must be a 2-D uint32 array");
  if (scales.ndim() != 2 || scales.shape() != biases.shape())
    fail(op, "scales and biases must be 2-D arrays of one shape, got " + shape_str(scales.shape()) + " and " +
                 shape_str(biases.shape()));
  if (!is_float(scales.dtype()) || scales.dtype() != biases.dtype())
    fail(op, "scales and biases must share one floating dtype (float32, float16 or bfloat16)");
  const int64_t K = static_cast<int64_t>(codes.shape(1)) * 32 / bits;
  if (scales.shape(0) != codes.shape(0) || static_cast<int64_t>(scales.shape(1)) * group_size != K)
    fail(op, "codes " + shape_str(codes.shape()) + " hold rows of " + std::to_string(K) + " " +
                 std::to_string(bits) + "-bit values, which need scales of shape (" + std::to_string(codes.shape(0)) +
                 ", " + std::to_string(K / group_size) + ") for group_size " + std::to_string(group_size) +
                 ", got " + shape_str(scales.shape()));
  if (K > kMaxK) fail(op, "rows longer than " + std::to_string(kMaxK) + " are not supported");
  return static_cast<int>(K);
}

// Row-major data of `a`: its own buffer when row-contiguous, else a strided copy into buf.
const char* contiguous(const mx::array& a, std::vector<char>& buf) {
  if (a.flags().row_contiguous) return a.data<char>();
  const size_t item = a.itemsize();
  buf.resize(a.size() * item);
  const char* src = a.data<char>();
  for (size_t i = 0; i < a.size(); ++i)
    std::memcpy(buf.data() + i * item, src + mx::elem_to_loc(static_cast<int>(i), a.shape(), a.strides()) * item,
                item);
  return buf.data();
}

template <typename T>
void convert_to_float(const T* src, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void convert_from_float(const float* src, size_t n, T* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

struct Scratch {
  std::vector<char> xc, cc, sc, bc;
  std::vector<float> x32, x2, d, xf, gsum, y, y2;
  std::vector<int8_t> q;
};

// Rows [x_0, r_0, x_1, r_1, ...]: each row of x followed by what its int8 quantization (prepare_acts' rounding,
// exactly) leaves out, so prepare_acts on these 2M rows quantizes x and then its residual, and the product's rows
// 2m and 2m + 1 add up to W @ (d1 q1 + d2 q2).
void residual_rows(const float* x, int64_t M, int K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* o = out + 2 * m * K;
    std::memcpy(o, xr, sizeof(float) * K);
    float* r = o + K;
    for (int b = 0; b < K / 32; ++b) {
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xr[b * 32 + j]));
      const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      for (int j = 0; j < 32; ++j) {
        const float v = xr[b * 32 + j];
        r[b * 32 + j] = v - dd * round_even(v * id);
      }
    }
  }
}

void run_qmatmul(const mx::array& x, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                 mx::array& out, int bits, int group_size, bool int8, int packed_rows, int terms) {
  const int K = x.shape(-1);
  const bool packed = packed_rows > 0;
  const int64_t N = packed ? packed_rows : codes.shape(0), M0 = K > 0 ? static_cast<int64_t>(x.size()) / K : 0;
  if (M0 == 0 || N == 0) return;
  thread_local Scratch t;
  const bool two = int8 && terms == 2;
  const int64_t M = two ? 2 * M0 : M0;

  // activations as float32 rows, then prepared for the kernels
  const char* xraw = contiguous(x, t.xc);
  const float* x32;
  if (x.dtype() == mx::float32) {
    x32 = reinterpret_cast<const float*>(xraw);
  } else {
    t.x32.resize(M0 * K);
    if (x.dtype() == mx::float16)
      convert_to_float(reinterpret_cast<const mx::float16_t*>(xraw), M0 * K, t.x32.data());
    else
      convert_to_float(reinterpret_cast<const mx::bfloat16_t*>(xraw), M0 * K, t.x32.data());
    x32 = t.x32.data();
  }
  if (two) {
    t.x2.resize(M * K);
    residual_rows(x32, M0, K, t.x2.data());
    x32 = t.x2.data();
  }
  const int nb = K / 32, G = K / group_size;
  t.gsum.resize(M * G);
  if (int8) {
    t.q.resize(M * K);
    t.d.resize(M * nb);
  } else {
    t.xf.resize(M * K);
  }
  const Tuning& tu = tuning();
  const KernelSet& ks = active_kernels();
  const bool tiles = packed || (int8 && ks.qmm_int8_tiles != nullptr && M >= tu.tiles_min_m);
  prepare_acts(x32, M, K, bits, group_size, int8, !int8, t.q.data(), t.d.data(), t.xf.data(), t.gsum.data(), tiles);

  const QWeight w{reinterpret_cast<const uint8_t*>(contiguous(codes, t.cc)), contiguous(scales, t.sc),
                  contiguous(biases, t.bc), float_type(scales.dtype()), N, K, bits, group_size};
  const QActs a{M, K, t.q.data(), t.d.data(), t.xf.data(), t.gsum.data()};
  float* y = out.data<float>();
  if (two) {
    t.y2.resize(M * N);
    y = t.y2.data();
  } else if (out.dtype() != mx::float32) {
    t.y.resize(M * N);
    y = t.y.data();
  }
  const QmmFn fn = packed ? ks.qmm_int8_packed : tiles ? ks.qmm_int8_tiles : int8 ? ks.qmm_int8 : ks.qmm_float;
  const int64_t align = tiles ? 16 : 4;  // chunks start on whole tiles
  const int threads = get_threads();
  // the work of the original rows decides (a second activation pass costs integer products, not weight reads)
  if (threads > 1 && static_cast<double>(M0) * N * K >= tu.parallel_min_work) {
    // about chunks_per_thread chunks per thread, whole multiples of 4 rows
    const int64_t target = static_cast<int64_t>(threads) * std::max(1, tu.chunks_per_thread);
    int64_t rows = (N + target - 1) / target;
    rows = std::max<int64_t>(align, (rows + align - 1) / align * align);
    const int64_t nchunks = (N + rows - 1) / rows;
    parallel_for(nchunks, threads, [&](int64_t c) { fn(w, a, y, N, c * rows, std::min(N, (c + 1) * rows)); });
  } else {
    fn(w, a, y, N, 0, N);
  }
  if (two) {  // each row's two passes added up
    float* sum = y;
    if (out.dtype() == mx::float32) sum = out.data<float>();
    else t.y.resize(M0 * N), sum = t.y.data();
    for (int64_t m = 0; m < M0; ++m) {
      const float* a0 = y + 2 * m * N;
      const float* a1 = a0 + N;
      float* o = sum + m * N;
      for (int64_t n = 0; n < N; ++n) o[n] = a0[n] + a1[n];
    }
    y = sum;
  }
  if (out.dtype() == mx::float16)
    convert_from_float(y, M0 * N, out.data<mx::float16_t>());
  else if (out.dtype() == mx::bfloat16)
    convert_from_float(y, M0 * N, out.data<mx::bfloat16_t>());
}

template <typename I, typename T>
void embed_rows(const I* ids, size_t count, const QWeight& w, T* out) {
  const int K = w.K, G = K / w.group_size;
  std::vector<float> s(G), b(G);
  const size_t row_bytes = static_cast<size_t>(K) * w.bits / 8, item = w.scale_type == FloatType::f32 ? 4 : 2;
  for (size_t i = 0; i < count; ++i) {
    int64_t n = static_cast<int64_t>(ids[i]);
    if (n < 0) n += w.N;                      // negative ids count from the end, as in Python
    n = std::min<int64_t>(std::max<int64_t>(n, 0), w.N - 1);  // out of range: clamped
    to_float(static_cast<const char*>(w.scales) + n * G * item, w.scale_type, G, s.data());
    to_float(static_cast<const char*>(w.biases) + n * G * item, w.scale_type, G, b.data());
    const uint8_t* c = w.codes + n * row_bytes;
    T* o = out + i * K;
    for (int k = 0; k < K; ++k) {
      const int code = w.bits == 4 ? (c[k >> 1] >> ((k & 1) * 4)) & 0x0F : c[k];
      o[k] = static_cast<T>(s[k / w.group_size] * static_cast<float>(code) + b[k / w.group_size]);
    }
  }
}

// The same from packed weights (see kernels_x86.inc): row n is lane n % 16 of tile n / 16.
template <typename I, typename T>
void embed_rows_packed(const I* ids, size_t count, const QWeight& w, T* out) {
  const int K = w.K;
  PackedRowReader row(w);
  for (size_t i = 0; i < count; ++i) {
    int64_t n = static_cast<int64_t>(ids[i]);
    if (n < 0) n += w.N;
    n = std::min<int64_t>(std::max<int64_t>(n, 0), w.N - 1);
    row.load(n);
    T* o = out + i * K;
    for (int k = 0; k < K; ++k) {
      const int g = k / w.group_size;
      o[k] = static_cast<T>(row.scale[g] * static_cast<float>(row.code(k)) + row.bias[g]);
    }
  }
}

template <typename I, typename T>
void embed_any(const I* ids, size_t count, const QWeight& w, bool packed, T* out) {
  if (packed)
    embed_rows_packed(ids, count, w, out);
  else
    embed_rows(ids, count, w, out);
}

template <typename I>
void embed_dispatch_out(const I* ids, size_t count, const QWeight& w, bool packed, mx::array& out) {
  if (out.dtype() == mx::float32)
    embed_any(ids, count, w, packed, out.data<float>());
  else if (out.dtype() == mx::float16)
    embed_any(ids, count, w, packed, out.data<mx::float16_t>());
  else
    embed_any(ids, count, w, packed, out.data<mx::bfloat16_t>());
}

void run_qembed(const mx::array& ids, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                mx::array& out, int bits, int group_size, int packed_rows) {
  if (ids.size() == 0) return;
  std::vector<char> ic, cc, sc, bc;
  const char* idp = contiguous(ids, ic);
  const bool packed = packed_rows > 0;
  const int K = out.shape(-1);
  const QWeight w{reinterpret_cast<const uint8_t*>(contiguous(codes, cc)), contiguous(scales, sc),
                  contiguous(biases, bc), float_type(scales.dtype()), packed ? packed_rows : codes.shape(0), K, bits,
                  group_size};
  switch (ids.dtype()) {
    case mx::int32:
      return embed_dispatch_out(reinterpret_cast<const int32_t*>(idp), ids.size(), w, packed, out);
    case mx::uint32:
      return embed_dispatch_out(reinterpret_cast<const uint32_t*>(idp), ids.size(), w, packed, out);
    case mx::int64:
      return embed_dispatch_out(reinterpret_cast<const int64_t*>(idp), ids.size(), w, packed, out);
    case mx::uint64:
      return embed_dispatch_out(reinterpret_cast<const uint64_t*>(idp), ids.size(), w, packed, out);
    case mx::int16:
      return embed_dispatch_out(reinterpret_cast<const int16_t*>(idp), ids.size(), w, packed, out);
    case mx::uint16:
      return embed_dispatch_out(reinterpret_cast<const uint16_t*>(idp), ids.size(), w, packed, out);
    case mx::int8:
      return embed_dispatch_out(reinterpret_cast<const int8_t*>(idp), ids.size(), w, packed, out);
    default:
      return embed_dispatch_out(reinterpret_cast<const uint8_t*>(idp), ids.size(), w, packed, out);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- qmatmul

int check_packed(const char* op, const mx::array& pcodes, const mx::array& pscales, const mx::array& pbiases,
                 int bits, int group_size, int n);


mx::array qmatmul(const mx::array& x, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                  int bits, int group_size, bool int8_activations, int act_terms, mx::StreamOrDevice s) {
  const char* op = "mlxc.qmatmul";
  const int K = check_layout(op, codes, scales, biases, bits, group_size);
  if (x.ndim() < 1 || x.shape(-1) != K)
    fail(op, "x " + shape_str(x.shape()) + " must end in K = " + std::to_string(K) + " to multiply W of shape (" +
                 std::to_string(codes.shape(0)) + ", " + std::to_string(K) + ")");
  if (!is_float(x.dtype())) fail(op, "x must be float32, float16 or bfloat16");
  if (act_terms != 1 && act_terms != 2) fail(op, "act_terms must be 1 or 2");
  mx::Shape shape = x.shape();
  shape.back() = codes.shape(0);
  return mx::array(std::move(shape), x.dtype(),
                   std::make_shared<QMatmul>(cpu_stream(s), bits, group_size, int8_activations, 0, act_terms),
                   {x, codes, scales, biases});
}

void QMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  enc.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), codes = mx::array::unsafe_weak_copy(inputs[1]),
                scales = mx::array::unsafe_weak_copy(inputs[2]), biases = mx::array::unsafe_weak_copy(inputs[3]),
                out = mx::array::unsafe_weak_copy(out), bits = bits_, gs = group_size_, int8 = int8_,
                packed = packed_rows_, terms = terms_]() mutable {
    run_qmatmul(x, codes, scales, biases, out, bits, gs, int8, packed, terms);
  });
}

void QMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcQMatmul] has no GPU implementation");
}

std::vector<mx::Shape> QMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  shape.back() = packed_rows_ > 0 ? packed_rows_ : inputs[1].shape(0);
  return {shape};
}

bool QMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QMatmul&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_ && int8_ == o.int8_ && packed_rows_ == o.packed_rows_ &&
         terms_ == o.terms_;
}

std::vector<mx::array> QMatmul::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                    const std::vector<int>& argnums) {
  for (int a : argnums)
    if (a != 0) throw std::invalid_argument("[MlxcQMatmul] is differentiable with respect to x only");
  if (packed_rows_ > 0)
    return {qmatmul_packed(tangents[0], primals[1], primals[2], primals[3], bits_, group_size_, packed_rows_,
                           terms_, stream())};
  return {qmatmul(tangents[0], primals[1], primals[2], primals[3], bits_, group_size_, int8_, terms_, stream())};
}

std::vector<mx::array> QMatmul::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums, const std::vector<mx::array>&) {
  std::vector<mx::array> grads;
  for (int a : argnums) {
    if (a != 0) throw std::invalid_argument("[MlxcQMatmul] is differentiable with respect to x only");
    if (packed_rows_ > 0) throw std::invalid_argument("[MlxcQMatmul] packed weights have no vjp; use the MLX layout");
    // d/dx (x @ W.T) = cotangent @ W: MLX's quantized matmul without the transpose, in float32
    auto f32 = [&](const mx::array& a) { return mx::astype(a, mx::float32, stream()); };
    auto g = mx::quantized_matmul(f32(cotangents[0]), primals[1], f32(primals[2]), f32(primals[3]),
                                  /*transpose=*/false, group_size_, bits_, "affine", stream());
    grads.push_back(mx::astype(g, primals[0].dtype(), stream()));
  }
  return grads;
}

mx::array qmatmul_packed(const mx::array& x, const mx::array& pcodes, const mx::array& pscales,
                         const mx::array& pbiases, int bits, int group_size, int n, int act_terms,
                         mx::StreamOrDevice s) {
  const char* op = "mlxc.qmatmul_packed";
  const int64_t K = check_packed(op, pcodes, pscales, pbiases, bits, group_size, n);
  if (x.ndim() < 1 || x.shape(-1) != K) fail(op, "x " + shape_str(x.shape()) + " must end in K = " + std::to_string(K));
  if (!is_float(x.dtype())) fail(op, "x must be float32, float16 or bfloat16");
  if (act_terms != 1 && act_terms != 2) fail(op, "act_terms must be 1 or 2");
  mx::Shape shape = x.shape();
  shape.back() = n;
  return mx::array(std::move(shape), x.dtype(),
                   std::make_shared<QMatmul>(cpu_stream(s), bits, group_size, true, n, act_terms),
                   {x, pcodes, pscales, pbiases});
}

// Validates the packed layout (mlxc.kernels.native.pack); returns K.
int check_packed(const char* op, const mx::array& pcodes, const mx::array& pscales, const mx::array& pbiases,
                 int bits, int group_size, int n) {
  if (bits != 4 && bits != 8) fail(op, "bits must be 4 or 8, got " + std::to_string(bits));
  if (group_size == 16 && bits != 8) fail(op, "group_size 16 (GGUF Q6_K's layout) needs 8-bit codes");
  if (group_size != 16 && group_size != 32 && group_size != 64 && group_size != 128)
    fail(op, "group_size must be 16 (8-bit), 32, 64 or 128, got " + std::to_string(group_size));
  if (n <= 0) fail(op, "n (the weight's row count) must be positive");
  const int64_t tiles = (static_cast<int64_t>(n) + 15) / 16, block_bytes = bits == 4 ? 256 : 512;
  if (pcodes.dtype() != mx::uint8 || pcodes.ndim() != 2 || pcodes.shape(0) != tiles ||
      pcodes.shape(1) % block_bytes != 0)
    fail(op, "pcodes must be uint8 of shape (ceil(n / 16), K / 32 * " + std::to_string(block_bytes) + "), got " +
                 shape_str(pcodes.shape()) + " for n = " + std::to_string(n) + " (use mlxc.kernels.native.pack)");
  const int64_t K = pcodes.shape(1) / block_bytes * 32;
  if (K % group_size != 0 || K > kMaxK) fail(op, "K = " + std::to_string(K) + " does not fit group_size");
  const mx::Shape want = {static_cast<int>(tiles), static_cast<int>(K / group_size * 16)};
  if (pscales.shape() != want || pbiases.shape() != want)
    fail(op, "pscales and pbiases must have shape " + shape_str(want) + ", got " + shape_str(pscales.shape()) +
                 " and " + shape_str(pbiases.shape()));
  if ((pscales.dtype() != mx::float32 && pscales.dtype() != mx::float16) || pbiases.dtype() != pscales.dtype())
    fail(op, "pscales and pbiases must share one dtype, float32 or float16");
  return static_cast<int>(K);
}

// ---------------------------------------------------------------------------------------------------- qembed

mx::array qembed(const mx::array& ids, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                 int bits, int group_size, std::optional<mx::Dtype> dtype, mx::StreamOrDevice s) {
  const char* op = "mlxc.qembed";
  const int K = check_layout(op, codes, scales, biases, bits, group_size, /*group16=*/true);
  if (!mx::issubdtype(ids.dtype(), mx::integer)) fail(op, "ids must be integers");
  const mx::Dtype out_type = dtype.value_or(scales.dtype());
  if (!is_float(out_type)) fail(op, "dtype must be float32, float16 or bfloat16");
  mx::Shape shape = ids.shape();
  shape.push_back(K);
  return mx::array(std::move(shape), out_type, std::make_shared<QEmbed>(cpu_stream(s), bits, group_size, K),
                   {ids, codes, scales, biases});
}

mx::array qembed_packed(const mx::array& ids, const mx::array& pcodes, const mx::array& pscales,
                        const mx::array& pbiases, int bits, int group_size, int n, std::optional<mx::Dtype> dtype,
                        mx::StreamOrDevice s) {
  const char* op = "mlxc.qembed_packed";
  const int K = check_packed(op, pcodes, pscales, pbiases, bits, group_size, n);
  if (!mx::issubdtype(ids.dtype(), mx::integer)) fail(op, "ids must be integers");
  const mx::Dtype out_type = dtype.value_or(pscales.dtype());
  if (!is_float(out_type)) fail(op, "dtype must be float32, float16 or bfloat16");
  mx::Shape shape = ids.shape();
  shape.push_back(K);
  return mx::array(std::move(shape), out_type, std::make_shared<QEmbed>(cpu_stream(s), bits, group_size, K, n),
                   {ids, pcodes, pscales, pbiases});
}

void QEmbed::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  enc.dispatch([ids = mx::array::unsafe_weak_copy(inputs[0]), codes = mx::array::unsafe_weak_copy(inputs[1]),
                scales = mx::array::unsafe_weak_copy(inputs[2]), biases = mx::array::unsafe_weak_copy(inputs[3]),
                out = mx::array::unsafe_weak_copy(out), bits = bits_, gs = group_size_, packed = packed_rows_]() mutable {
    run_qembed(ids, codes, scales, biases, out, bits, gs, packed);
  });
}

void QEmbed::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcQEmbed] has no GPU implementation");
}

std::vector<mx::Shape> QEmbed::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  shape.push_back(k_);
  return {shape};
}

bool QEmbed::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QEmbed&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_ && k_ == o.k_ && packed_rows_ == o.packed_rows_;
}

}  // namespace mlxc_native
