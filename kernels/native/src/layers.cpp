#include "layers.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "parallel.h"

namespace mlxc_native {
namespace {

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("[") + op + "] " + what);
}

bool is_float(mx::Dtype t) { return t == mx::float32 || t == mx::float16 || t == mx::bfloat16; }

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  mx::Stream st = mx::to_stream(s, mx::Device::cpu);
  if (st.device != mx::Device::cpu) throw std::invalid_argument("mlxc native kernels run on the CPU only");
  return st;
}

// Calls f with a pointer of the array's element type (float32, float16 or bfloat16).
template <typename F>
void with_float_type(const mx::array& a, F&& f) {
  if (a.dtype() == mx::float32)
    f(a.data<float>());
  else if (a.dtype() == mx::float16)
    f(a.data<mx::float16_t>());
  else
    f(a.data<mx::bfloat16_t>());
}

template <typename T>
float to_f(T v) { return static_cast<float>(v); }

// The primitives' gradients: MLX's own ops on the same inputs (the reference), differentiated by MLX.
std::vector<mx::array> reference_vjp(const std::function<std::vector<mx::array>(const std::vector<mx::array>&)>& f,
                                     const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                     const std::vector<int>& argnums) {
  auto [_, grads] = mx::vjp(f, primals, cotangents);
  std::vector<mx::array> out;
  for (int a : argnums) out.push_back(grads[a]);
  return out;
}

void prepare_output(mx::array& out, const std::vector<mx::array>& inputs, mx::Stream stream) {
  auto& enc = mx::cpu::get_command_encoder(stream);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
}

// ------------------------------------------------------------------------------------------------ rms_norm

template <typename T>
void rms_norm_rows(const mx::array& x, const mx::array& w, float eps, mx::array& out) {
  const int D = x.shape(-1);
  const int64_t rows = D > 0 ? static_cast<int64_t>(x.size()) / D : 0;
  const T* xp = x.data<T>();
  const T* wp = w.data<T>();
  T* op = out.data<T>();
  const bool contiguous = x.flags().row_contiguous;
  std::vector<float> row(D);
  for (int64_t r = 0; r < rows; ++r) {
    if (contiguous) {
      for (int i = 0; i < D; ++i) row[i] = to_f(xp[r * D + i]);
    } else {
      for (int i = 0; i < D; ++i)
        row[i] = to_f(xp[mx::elem_to_loc(static_cast<int>(r * D + i), x.shape(), x.strides())]);
    }
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= D; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += row[i + j] * row[i + j];
    float ss = 0.f;
    for (; i < D; ++i) ss += row[i] * row[i];
    for (int j = 0; j < 8; ++j) ss += acc[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    T* o = op + r * D;
    for (int k = 0; k < D; ++k) o[k] = static_cast<T>(to_f(static_cast<T>(row[k] * inv)) * to_f(wp[k]));
  }
}

// ------------------------------------------------------------------------------------------------ rope

template <typename T>
void rope_run(const mx::array& x, const mx::array& freqs, int dims, bool traditional, int offset, mx::array& out) {
  const int B = x.shape(0), H = x.shape(1), T_ = x.shape(2), D = x.shape(3), half = dims / 2;
  const auto& st = x.strides();
  const T* xp = x.data<T>();
  T* op = out.data<T>();
  const float* fp = freqs.data<float>();
  std::vector<float> inv(half), cs(static_cast<size_t>(T_) * half), sn(static_cast<size_t>(T_) * half);
  for (int i = 0; i < half; ++i) inv[i] = 1.0f / fp[i];
  for (int t = 0; t < T_; ++t) {
    const float pos = static_cast<float>(t) + static_cast<float>(offset);
    for (int i = 0; i < half; ++i) {
      const float theta = pos * inv[i];
      cs[t * half + i] = to_f(static_cast<T>(std::cos(theta)));
      sn[t * half + i] = to_f(static_cast<T>(std::sin(theta)));
    }
  }
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T_; ++t) {
        const T* xr = xp + b * st[0] + h * st[1] + t * st[2];
        const int64_t sd = st[3];
        T* o = op + ((static_cast<int64_t>(b) * H + h) * T_ + t) * D;
        const float* c = cs.data() + t * half;
        const float* s = sn.data() + t * half;
        if (traditional) {
          for (int i = 0; i < half; ++i) {
            const float x1 = to_f(xr[2 * i * sd]), x2 = to_f(xr[(2 * i + 1) * sd]);
            o[2 * i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
            o[2 * i + 1] = static_cast<T>(x1 * s[i] + x2 * c[i]);
          }
        } else {
          for (int i = 0; i < half; ++i) {
            const float x1 = to_f(xr[i * sd]), x2 = to_f(xr[(i + half) * sd]);
            o[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
            o[i + half] = static_cast<T>(x1 * s[i] + x2 * c[i]);
          }
        }
        for (int i = dims; i < D; ++i) o[i] = xr[i * sd];
      }
}

int read_offset(const mx::array& a) {
  switch (a.dtype()) {
    case mx::int32: return a.data<int32_t>()[0];
    case mx::int64: return static_cast<int>(a.data<int64_t>()[0]);
    case mx::uint32: return static_cast<int>(a.data<uint32_t>()[0]);
    default: return static_cast<int>(a.data<int16_t>()[0]);
  }
}

// ------------------------------------------------------------------------------------------------ attention

template <typename T>
void attention_run(const mx::array& q, const mx::array& k, const mx::array& v, float scale, int window,
                   mx::array& out) {
  const int B = q.shape(0), Hq = q.shape(1), D = q.shape(3), Hkv = k.shape(1), S = k.shape(2), Dv = v.shape(3);
  const int rep = Hq / Hkv;
  const int start = window > 0 ? std::max(0, S - window) : 0, L = S - start;
  const auto &qs = q.strides(), &ks = k.strides(), &vs = v.strides();
  const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
  T* op = out.data<T>();
  auto head = [&](int64_t idx) {
    const int b = static_cast<int>(idx / Hq), h = static_cast<int>(idx % Hq), kh = h / rep;
    thread_local std::vector<float> qf, sc, acc;
    qf.resize(D);
    sc.resize(L);
    acc.assign(Dv, 0.f);
    const T* qr = qp + b * qs[0] + h * qs[1];
    for (int d = 0; d < D; ++d) qf[d] = to_f(static_cast<T>(to_f(qr[d * qs[3]]) * scale));  // q * scale, as MLX
    const T* kb = kp + b * ks[0] + kh * ks[1];
    const T* vb = vp + b * vs[0] + kh * vs[1];
    float mx_ = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < L; ++j) {
      const T* kr = kb + static_cast<int64_t>(start + j) * ks[2];
      float a8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      float dot = 0.f;
      int d = 0;
      if (ks[3] == 1) {
        for (; d + 8 <= D; d += 8)
          for (int u = 0; u < 8; ++u) a8[u] += qf[d + u] * to_f(kr[d + u]);
      }
      for (; d < D; ++d) dot += qf[d] * to_f(kr[d * ks[3]]);
      for (int u = 0; u < 8; ++u) dot += a8[u];
      sc[j] = dot;
      mx_ = std::max(mx_, dot);
    }
    float total = 0.f;
    for (int j = 0; j < L; ++j) {
      sc[j] = std::exp(sc[j] - mx_);
      total += sc[j];
    }
    const float norm = 1.0f / total;
    for (int j = 0; j < L; ++j) {
      const float p = to_f(static_cast<T>(sc[j] * norm));  // the probabilities in the inputs' dtype, as MLX
      const T* vr = vb + static_cast<int64_t>(start + j) * vs[2];
      if (vs[3] == 1) {
        for (int d = 0; d < Dv; ++d) acc[d] += p * to_f(vr[d]);
      } else {
        for (int d = 0; d < Dv; ++d) acc[d] += p * to_f(vr[d * vs[3]]);
      }
    }
    T* o = op + (static_cast<int64_t>(b) * Hq + h) * Dv;
    for (int d = 0; d < Dv; ++d) o[d] = static_cast<T>(acc[d]);
  };
  const int64_t heads = static_cast<int64_t>(B) * Hq;
  const int threads = get_threads();
  if (threads > 1 && heads > 1 && static_cast<int64_t>(L) * (D + Dv) * heads >= (1 << 17))
    parallel_for(heads, threads, head);
  else
    for (int64_t i = 0; i < heads; ++i) head(i);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- rms_norm

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  const char* op = "mlxc.rms_norm";
  if (x.ndim() < 1 || !is_float(x.dtype())) fail(op, "x must be a float32, float16 or bfloat16 array");
  if (w.ndim() != 1 || w.shape(0) != x.shape(-1)) fail(op, "w must be a vector as long as x's last axis");
  const mx::Stream st = cpu_stream(s);
  return mx::array(x.shape(), x.dtype(), std::make_shared<RMSNormPrim>(st, eps),
                   {x, w.dtype() == x.dtype() ? w : mx::astype(w, x.dtype(), st)});
}

void RMSNormPrim::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare_output(out, inputs, stream());
  mx::cpu::get_command_encoder(stream()).dispatch(
      [x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
       out = mx::array::unsafe_weak_copy(out), eps = eps_]() mutable {
        if (x.dtype() == mx::float32) rms_norm_rows<float>(x, w, eps, out);
        else if (x.dtype() == mx::float16) rms_norm_rows<mx::float16_t>(x, w, eps, out);
        else rms_norm_rows<mx::bfloat16_t>(x, w, eps, out);
      });
}

void RMSNormPrim::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcRMSNorm] has no GPU implementation");
}

std::vector<mx::array> RMSNormPrim::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                        const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const float eps = eps_;
  const mx::Stream st = stream();
  return reference_vjp([eps, st](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::fast::rms_norm(in[0], in[1], eps, st)};
  }, primals, cotangents, argnums);
}

bool RMSNormPrim::is_equivalent(const mx::Primitive& other) const {
  return eps_ == static_cast<const RMSNormPrim&>(other).eps_;
}

// ---------------------------------------------------------------------------------------------------- rope

namespace {
void check_rope(const mx::array& x, int dims, const mx::array& freqs) {
  const char* op = "mlxc.rope";
  if (x.ndim() != 4 || !is_float(x.dtype())) fail(op, "x must be a [B, H, T, D] float array");
  if (dims <= 0 || dims % 2 != 0 || dims > x.shape(3)) fail(op, "dims must be even and at most D");
  if (freqs.ndim() != 1 || freqs.shape(0) != dims / 2) fail(op, "freqs must be a vector of dims / 2 entries");
}
}  // namespace

mx::array rope(const mx::array& x, int dims, bool traditional, const mx::array& freqs, int offset,
               mx::StreamOrDevice s) {
  check_rope(x, dims, freqs);
  const mx::Stream st = cpu_stream(s);
  return mx::array(x.shape(), x.dtype(), std::make_shared<RopePrim>(st, dims, traditional, offset),
                   {x, mx::astype(freqs, mx::float32, st)});
}

mx::array rope(const mx::array& x, int dims, bool traditional, const mx::array& freqs, const mx::array& offset,
               mx::StreamOrDevice s) {
  check_rope(x, dims, freqs);
  if (offset.size() != 1 || !mx::issubdtype(offset.dtype(), mx::integer))
    fail("mlxc.rope", "offset must be one integer");
  const mx::Stream st = cpu_stream(s);
  return mx::array(x.shape(), x.dtype(), std::make_shared<RopePrim>(st, dims, traditional, 0),
                   {x, mx::astype(freqs, mx::float32, st), mx::astype(offset, mx::int32, st)});
}

void RopePrim::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare_output(out, inputs, stream());
  std::vector<mx::array> ins;
  for (const auto& a : inputs) ins.push_back(mx::array::unsafe_weak_copy(a));
  mx::cpu::get_command_encoder(stream()).dispatch(
      [ins = std::move(ins), out = mx::array::unsafe_weak_copy(out), dims = dims_, trad = traditional_,
       off = offset_]() mutable {
        const int offset = ins.size() > 2 ? read_offset(ins[2]) : off;
        const mx::array& x = ins[0];
        if (x.dtype() == mx::float32) rope_run<float>(x, ins[1], dims, trad, offset, out);
        else if (x.dtype() == mx::float16) rope_run<mx::float16_t>(x, ins[1], dims, trad, offset, out);
        else rope_run<mx::bfloat16_t>(x, ins[1], dims, trad, offset, out);
      });
}

void RopePrim::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcRope] has no GPU implementation");
}

std::vector<mx::array> RopePrim::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                     const std::vector<int>& argnums, const std::vector<mx::array>&) {
  for (int a : argnums)
    if (a != 0) throw std::invalid_argument("[MlxcRope] is differentiable with respect to x only");
  const int dims = dims_, off = offset_;
  const bool trad = traditional_;
  const mx::Stream st = stream();
  const bool has_offset = primals.size() > 2;
  return reference_vjp([=](const std::vector<mx::array>& in) {
    if (has_offset)
      return std::vector<mx::array>{mx::fast::rope(in[0], dims, trad, std::nullopt, 1.0f, in[2], in[1], st)};
    return std::vector<mx::array>{mx::fast::rope(in[0], dims, trad, std::nullopt, 1.0f, off, in[1], st)};
  }, primals, cotangents, argnums);
}

bool RopePrim::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const RopePrim&>(other);
  return dims_ == o.dims_ && traditional_ == o.traditional_ && offset_ == o.offset_;
}

// ---------------------------------------------------------------------------------------------------- attention

mx::array attention_decode(const mx::array& q, const mx::array& k, const mx::array& v, float scale, int window,
                           mx::StreamOrDevice s) {
  const char* op = "mlxc.attention_decode";
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) fail(op, "q, k and v must be [B, heads, T, D] arrays");
  if (q.shape(2) != 1) fail(op, "one query per head (decode): q must be [B, H, 1, D]");
  if (!is_float(q.dtype()) || k.dtype() != q.dtype() || v.dtype() != q.dtype())
    fail(op, "q, k and v must share one float dtype");
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) || k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2))
    fail(op, "k and v must be [B, Hkv, S, D] like each other and q's batch");
  if (k.shape(3) != q.shape(3)) fail(op, "q and k head dims differ");
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0) fail(op, "query heads must be a multiple of key heads");
  if (k.shape(2) == 0) fail(op, "no keys");
  mx::Shape shape = q.shape();
  shape[3] = v.shape(3);
  return mx::array(std::move(shape), q.dtype(), std::make_shared<AttentionDecodePrim>(cpu_stream(s), scale, window),
                   {q, k, v});
}

void AttentionDecodePrim::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare_output(out, inputs, stream());
  mx::cpu::get_command_encoder(stream()).dispatch(
      [q = mx::array::unsafe_weak_copy(inputs[0]), k = mx::array::unsafe_weak_copy(inputs[1]),
       v = mx::array::unsafe_weak_copy(inputs[2]), out = mx::array::unsafe_weak_copy(out), scale = scale_,
       window = window_]() mutable {
        if (q.dtype() == mx::float32) attention_run<float>(q, k, v, scale, window, out);
        else if (q.dtype() == mx::float16) attention_run<mx::float16_t>(q, k, v, scale, window, out);
        else attention_run<mx::bfloat16_t>(q, k, v, scale, window, out);
      });
}

void AttentionDecodePrim::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcAttentionDecode] has no GPU implementation");
}

std::vector<mx::Shape> AttentionDecodePrim::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  shape[3] = inputs[2].shape(3);
  return {shape};
}

std::vector<mx::array> AttentionDecodePrim::vjp(const std::vector<mx::array>& primals,
                                                const std::vector<mx::array>& cotangents,
                                                const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const float scale = scale_;
  const int window = window_;
  const mx::Stream st = stream();
  return reference_vjp([=](const std::vector<mx::array>& in) {
    mx::array k = in[1], v = in[2];
    const int S = k.shape(2);
    if (window > 0 && S > window) {
      k = mx::slice(k, {0, 0, S - window, 0}, k.shape(), st);
      v = mx::slice(v, {0, 0, S - window, 0}, v.shape(), st);
    }
    return std::vector<mx::array>{mx::fast::scaled_dot_product_attention(in[0], k, v, scale, "", {}, {}, false, st)};
  }, primals, cotangents, argnums);
}

bool AttentionDecodePrim::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AttentionDecodePrim&>(other);
  return scale_ == o.scale_ && window_ == o.window_;
}

}  // namespace mlxc_native
