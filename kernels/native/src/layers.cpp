#include "layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "dispatch.h"
#include "kernels.h"
#include "parallel.h"
#include "prim.h"

namespace mlxc_native {
namespace {

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

// ------------------------------------------------------------------------------------------------ float32 vectors
// layers.cpp is compiled for baseline x86-64, so its hot float32 loops are compiled three times here, for AVX-512,
// for AVX2 + FMA and for the baseline (function target attributes), and run for the instruction set the other
// kernels run (dispatch.cpp: the best the CPU has, or MLXC_NATIVE_ISA / set_isa, so tests reach every copy). They
// are written once with GCC vector extensions of N lanes, N the width of the copy's registers (16, 8 or 4 floats);
// everything they call is always inlined, so each copy compiles it for its instruction set.
#define MLXC_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // wide vectors only pass between always-inlined helpers
#endif

template <int N>
struct Lanes;
template <>
struct Lanes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4), may_alias));  // for unaligned loads and stores
};
template <>
struct Lanes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef float U __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct Lanes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef float U __attribute__((vector_size(16), aligned(4), may_alias));
};

template <int N>
MLXC_INLINE typename Lanes<N>::F vsplat(float x) {
  return typename Lanes<N>::F{} + x;
}
template <int N>
MLXC_INLINE typename Lanes<N>::F vload(const float* p) {
  return *reinterpret_cast<const typename Lanes<N>::U*>(p);
}
template <int N>
MLXC_INLINE void vstore(float* p, const typename Lanes<N>::F& v) {
  *reinterpret_cast<typename Lanes<N>::U*>(p) = v;
}

template <int N>
MLXC_INLINE float vsum(const typename Lanes<N>::F& v) {  // halving tree
  if constexpr (N == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    typename Lanes<N / 2>::F lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return vsum<N / 2>(lo + hi);
  }
}

#if defined(__clang__) || __GNUC__ >= 12
#define MLXC_SHUFFLE(T, I, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define MLXC_SHUFFLE(T, I, a, b, ...) __builtin_shuffle(a, b, I{__VA_ARGS__})
#endif

// The lane sums of eight vectors a[0..7] at once, into out[0..7]: a transposing halving tree, ~3 shuffles and
// adds per sum instead of ~8 (N = 16 or 8).
template <int N>
MLXC_INLINE void vsum8(const typename Lanes<N>::F* a, float* out) {
  using F = typename Lanes<N>::F;
  using I [[maybe_unused]] = typename Lanes<N>::I;  // for GCC < 12's __builtin_shuffle
  if constexpr (N == 16) {
    F x[4], y[2];
    for (int i = 0; i < 4; ++i)  // [a(2i) lanes l + l+8 | a(2i+1) lanes l + l+8]
      x[i] = MLXC_SHUFFLE(F, I, a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             MLXC_SHUFFLE(F, I, a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)  // four partial sums per vector
      y[i] = MLXC_SHUFFLE(F, I, x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
             MLXC_SHUFFLE(F, I, x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const F z =  // two per vector
        MLXC_SHUFFLE(F, I, y[0], y[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
        MLXC_SHUFFLE(F, I, y[0], y[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    const F w = MLXC_SHUFFLE(F, I, z, z, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
                MLXC_SHUFFLE(F, I, z, z, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    std::memcpy(out, &w, 8 * sizeof(float));
  } else {
    static_assert(N == 8, "vsum8 takes 16- or 8-lane vectors");
    F x[4], y[2];
    for (int i = 0; i < 4; ++i)
      x[i] = MLXC_SHUFFLE(F, I, a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
             MLXC_SHUFFLE(F, I, a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; ++i)
      y[i] = MLXC_SHUFFLE(F, I, x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
             MLXC_SHUFFLE(F, I, x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    const F z = MLXC_SHUFFLE(F, I, y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14) +
                MLXC_SHUFFLE(F, I, y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15);
    vstore<8>(out, z);
  }
}

// exp per lane: 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by Cephes' expf polynomial (~2 ulp).
// Flushes to 0 below -87.34 (where e^x would be subnormal) and overflows to +inf above 88.38, like MLX's own
// vector exp (which cuts at -88 and 88); NaN stays NaN.
template <int N>
MLXC_INLINE typename Lanes<N>::F vexp(const typename Lanes<N>::F& x) {
  using F = typename Lanes<N>::F;
  using I = typename Lanes<N>::I;
  const F lo = vsplat<N>(-87.33654f), hi = vsplat<N>(88.37626f);
  F xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Adding 1.5 * 2^23 rounds x / ln 2 to an integer n, which then sits in the sum's low mantissa bits.
  const F t = xc * 1.44269504088896341f + 12582912.0f;
  const F n = t - 12582912.0f;
  F r = xc - n * 0.693359375f;  // ln 2 in two parts, the first exact in float
  r = r - n * -2.12194440e-4f;
  F p = vsplat<N>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F er = p * (r * r) + r + 1.0f;
  const I pow2 = ((I)t - (0x4B400000 - 127)) << 23;  // (n + 127) << 23: the bits of 2^n
  F y = er * (F)pow2;
  y = x < lo ? F{} : y;
  y = x > hi ? vsplat<N>(std::numeric_limits<float>::infinity()) : y;
  return y;
}

// s[r * ls + j] = q_r . k_j for the NR query rows q_r = q + r D and keys k_j = k + j ks, j < L: each key row is
// loaded once for all NR heads that share it (grouped-query attention), one lane sum per head and key.
template <int N, int NR>
MLXC_INLINE void qk_rows(const float* q, int D, const float* k, int64_t ks, int L, float* s, int64_t ls) {
  using F = typename Lanes<N>::F;
  const int DN = D - D % N;
  for (int j = 0; j < L; ++j) {
    const float* kr = k + j * ks;
    F acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = F{};
    for (int d = 0; d < DN; d += N) {
      const F kv = vload<N>(kr + d);
      for (int r = 0; r < NR; ++r) acc[r] += vload<N>(q + r * D + d) * kv;
    }
    for (int r = 0; r < NR; ++r) {
      float t = vsum<N>(acc[r]);
      for (int d = DN; d < D; ++d) t += q[r * D + d] * kr[d];
      s[r * ls + j] = t;
    }
  }
}

// The same eight keys at a time, all heads of the group on each block of eight (which stays in L1), their lane
// sums by vsum8: head_dim 64 leaves too few multiply-adds per key to hide one lane sum each.
template <int N>
MLXC_INLINE void qk_rows8(const float* q, int rep, int D, const float* k, int64_t ks, int L, float* s, int64_t ls) {
  using F = typename Lanes<N>::F;
  const int DN = D - D % N, L8 = L & ~7;
  for (int j = 0; j < L8; j += 8) {
    const float* kr = k + j * ks;
    for (int r = 0; r < rep; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * D;
      F acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = F{};
      for (int d = 0; d < DN; d += N) {
        const F qv = vload<N>(qr + d);
        for (int i = 0; i < 8; ++i) acc[i] += qv * vload<N>(kr + i * ks + d);
      }
      float* sr = s + r * ls + j;
      vsum8<N>(acc, sr);
      for (int d = DN; d < D; ++d)
        for (int i = 0; i < 8; ++i) sr[i] += qr[d] * kr[i * ks + d];
    }
  }
  for (int r = 0; r < rep && L8 < L; ++r)
    qk_rows<N, 1>(q + static_cast<int64_t>(r) * D, D, k + L8 * ks, ks, L - L8, s + r * ls + L8, ls);
}

template <int N>
MLXC_INLINE void qk_scores_body(const float* q, int rep, int D, const float* k, int64_t ks, int L, float* s,
                                int64_t ls) {
  if constexpr (N >= 8) {
    qk_rows8<N>(q, rep, D, k, ks, L, s, ls);
  } else {
    for (int r = 0; r < rep; r += 4) {
      const float* qr = q + static_cast<int64_t>(r) * D;
      float* sr = s + r * ls;
      const int nr = rep - r < 4 ? rep - r : 4;
      if (nr == 4) qk_rows<N, 4>(qr, D, k, ks, L, sr, ls);
      else if (nr == 3) qk_rows<N, 3>(qr, D, k, ks, L, sr, ls);
      else if (nr == 2) qk_rows<N, 2>(qr, D, k, ks, L, sr, ls);
      else qk_rows<N, 1>(qr, D, k, ks, L, sr, ls);
    }
  }
}

// s_j = exp(s_j - max s) for j < L; returns their sum, and the max in *max_out.
template <int N>
MLXC_INLINE float softmax_body(float* s, int L, float* max_out) {
  using F = typename Lanes<N>::F;
  const float ninf = -std::numeric_limits<float>::infinity();
  F vm = vsplat<N>(ninf);
  int j = 0;
  for (; j + N <= L; j += N) {
    const F x = vload<N>(s + j);
    vm = x > vm ? x : vm;
  }
  float m = ninf;
  for (int i = 0; i < N; ++i) m = vm[i] > m ? vm[i] : m;
  for (; j < L; ++j) m = s[j] > m ? s[j] : m;
  F sum{};
  j = 0;
  for (; j + N <= L; j += N) {
    const F e = vexp<N>(vload<N>(s + j) - m);
    vstore<N>(s + j, e);
    sum += e;
  }
  if (j < L) {  // the tail as one more vector, padded with -inf (exp: 0)
    float tail[N];
    for (int i = 0; i < N; ++i) tail[i] = j + i < L ? s[j + i] - m : ninf;
    const F e = vexp<N>(vload<N>(tail));
    sum += e;
    vstore<N>(tail, e);
    for (int i = 0; j + i < L; ++i) s[j + i] = tail[i];
  }
  *max_out = m;
  return vsum<N>(sum);
}

// o_r = sum_j p_r[j] v_j for NR probability rows p_r = p + r lp and values v_j = v + j vs, j < L; o_r = o + r D;
// here only the PB N-lane blocks of head_dim from d on. PB * NR independent accumulations hide the multiply-add
// latency, and each probability is broadcast once per pass over the values.
template <int N, int NR, int PB>
MLXC_INLINE void pv_pass(const float* p, int64_t lp, int L, const float* v, int64_t vs, int D, float* o, int d) {
  using F = typename Lanes<N>::F;
  F acc[NR][PB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < PB; ++b) acc[r][b] = F{};
  for (int j = 0; j < L; ++j) {
    const float* vr = v + j * vs + d;
    F vv[PB];
    for (int b = 0; b < PB; ++b) vv[b] = vload<N>(vr + N * b);
    for (int r = 0; r < NR; ++r) {
      const float pj = p[r * lp + j];  // (vector * scalar broadcasts it; vsplat would add 0 first)
      for (int b = 0; b < PB; ++b) acc[r][b] += vv[b] * pj;
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < PB; ++b) vstore<N>(o + r * D + d + N * b, acc[r][b]);
}

// All of head_dim: PB blocks per pass (as many as the registers hold), then single blocks, then the features past
// the last block.
template <int N, int NR, int PB>
MLXC_INLINE void pv_rows(const float* p, int64_t lp, int L, const float* v, int64_t vs, int D, float* o) {
  const int DN = D - D % N;
  int d = 0;
  for (; d + N * PB <= DN; d += N * PB) pv_pass<N, NR, PB>(p, lp, L, v, vs, D, o, d);
  for (; d < DN; d += N) pv_pass<N, NR, 1>(p, lp, L, v, vs, D, o, d);
  for (; d < D; ++d)
    for (int r = 0; r < NR; ++r) {
      float t = 0.f;
      for (int j = 0; j < L; ++j) t += p[r * lp + j] * v[j * vs + d];
      o[r * D + d] = t;
    }
}

template <int N, int PB>
MLXC_INLINE void pv_body(const float* p, int64_t lp, int rep, int L, const float* v, int64_t vs, int D, float* o) {
  for (int r = 0; r < rep; r += 4) {
    const float* pr = p + r * lp;
    float* orow = o + static_cast<int64_t>(r) * D;
    const int nr = rep - r < 4 ? rep - r : 4;
    if (nr == 4) pv_rows<N, 4, PB>(pr, lp, L, v, vs, D, orow);
    else if (nr == 3) pv_rows<N, 3, PB>(pr, lp, L, v, vs, D, orow);
    else if (nr == 2) pv_rows<N, 2, PB>(pr, lp, L, v, vs, D, orow);
    else pv_rows<N, 1, PB>(pr, lp, L, v, vs, D, orow);
  }
}

// act(a) * b per lane. silu: a sigmoid(a). gelu_tanh: 0.5 a (1 + tanh u) with u = sqrt(2/pi) (a + 0.044715 a^3),
// computed as a sigmoid(2u), the same function without the cancellation of 1 + tanh u at negative u.
template <int N>
MLXC_INLINE typename Lanes<N>::F glu_lanes(const typename Lanes<N>::F& a, const typename Lanes<N>::F& b, bool gelu) {
  using F = typename Lanes<N>::F;
  const F t = gelu ? (a + a * a * a * 0.044715f) * -1.5957691216057308f : -a;  // -2u, or -a
  return a / (1.0f + vexp<N>(t)) * b;
}

template <int N>
MLXC_INLINE void glu_body(const float* a, const float* b, float* y, int64_t n, bool gelu) {
  int64_t i = 0;
  for (; i + N <= n; i += N) vstore<N>(y + i, glu_lanes<N>(vload<N>(a + i), vload<N>(b + i), gelu));
  if (i < n) {
    float ta[N] = {}, tb[N] = {}, ty[N];
    for (int64_t k = i; k < n; ++k) ta[k - i] = a[k], tb[k - i] = b[k];
    vstore<N>(ty, glu_lanes<N>(vload<N>(ta), vload<N>(tb), gelu));
    for (int64_t k = i; k < n; ++k) y[k] = ty[k - i];
  }
}

struct VecOps {
  void (*qk_scores)(const float* q, int rep, int D, const float* k, int64_t ks, int L, float* s, int64_t ls);
  float (*softmax_numerators)(float* s, int L, float* max_out);
  void (*pv_accumulate)(const float* p, int64_t lp, int rep, int L, const float* v, int64_t vs, int D, float* o);
  void (*glu)(const float* a, const float* b, float* y, int64_t n, bool gelu);
};

// One copy of the loops for one instruction set: ATTR its target attribute (nothing for the baseline), N floats per
// register, PB blocks of N per pass over the values (4 x up to 4 heads of accumulators: AVX-512's 32 registers).
#define MLXC_VEC_OPS(NS, ATTR, N, PB)                                                                             \
  namespace NS {                                                                                                 \
  ATTR void qk_scores(const float* q, int rep, int D, const float* k, int64_t ks, int L, float* s, int64_t ls) {  \
    qk_scores_body<N>(q, rep, D, k, ks, L, s, ls);                                                               \
  }                                                                                                              \
  ATTR float softmax_numerators(float* s, int L, float* max_out) { return softmax_body<N>(s, L, max_out); }       \
  ATTR void pv_accumulate(const float* p, int64_t lp, int rep, int L, const float* v, int64_t vs, int D,         \
                          float* o) {                                                                            \
    pv_body<N, PB>(p, lp, rep, L, v, vs, D, o);                                                                  \
  }                                                                                                              \
  ATTR void glu(const float* a, const float* b, float* y, int64_t n, bool gelu) {                                \
    glu_body<N>(a, b, y, n, gelu);                                                                               \
  }                                                                                                              \
  const VecOps ops{qk_scores, softmax_numerators, pv_accumulate, glu};                                           \
  }

MLXC_VEC_OPS(vec_base, , 4, 2)
#if MLXC_HAVE_X86 && defined(__GNUC__)
MLXC_VEC_OPS(vec_avx2, __attribute__((target("avx2,fma,f16c"))), 8, 2)
MLXC_VEC_OPS(vec_avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), 16, 4)
#endif

const VecOps& vec_ops() {
#if MLXC_HAVE_X86 && defined(__GNUC__)
  const std::string isa = active_kernels().name;
  if (isa.rfind("avx512", 0) == 0) return vec_avx512::ops;
  if (isa == "avx2") return vec_avx2::ops;
#endif
  return vec_base::ops;
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

// Causal attention for T > 1 queries (a prompt). Work items are (batch, kv head, block of qb queries): the item's
// rep * qb query rows (every query head that shares the kv head) go through the vectorized helpers together, so the
// block's keys and values are read once for all of them. Every row is scored against the block's key range (that of
// its last query, from its first query's window start); each row's softmax covers its own keys only and the rest of
// its row is zeroed, which wastes at most qb - 1 keys per row on the diagonal (and at the window's start).
template <typename T>
void prefill_run(const mx::array& q, const mx::array& k, const mx::array& v, float scale, int window,
                 mx::array& out) {
  const int B = q.shape(0), Hq = q.shape(1), Tq = q.shape(2), D = q.shape(3), Hkv = k.shape(1), S = k.shape(2),
            Dv = v.shape(3);
  if (B == 0 || Tq == 0 || Hq == 0) return;
  const int rep = Hq / Hkv, past = S - Tq;
  const auto &qs = q.strides(), &ks = k.strides(), &vs = v.strides();
  const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
  T* op = out.data<T>();
  const VecOps& vo = vec_ops();

  // ~32 rows per item: enough rows to amortize each key row's loads, few enough that the queries and a block of
  // keys stay in L1 and the diagonal's waste stays small.
  int qb = std::max(1, std::min(Tq, (32 + rep - 1) / rep));
  const int64_t avg_keys = window > 0 ? std::min<int64_t>(window, past + (Tq + 1) / 2) : past + (Tq + 1) / 2;
  const int threads = get_threads();
  const bool parallel =
      threads > 1 && static_cast<int64_t>(B) * Hq * Tq * avg_keys * (D + Dv) >= tuning().parallel_min_work;
  if (parallel)  // enough items that the threads finish together (3 kv heads of 128 queries: 36 items)
    while (qb > 4 && static_cast<int64_t>(B) * Hkv * ((Tq + qb - 1) / qb) < 8 * threads) qb = (qb + 1) / 2;
  const int nb = (Tq + qb - 1) / qb;
  const int64_t items = static_cast<int64_t>(B) * Hkv * nb;
  const bool k_direct = std::is_same_v<T, float> && ks[3] == 1, v_direct = std::is_same_v<T, float> && vs[3] == 1;

  auto item = [&](int64_t it) {
    const int blk = nb - 1 - static_cast<int>(it % nb);  // the longest blocks (latest queries) first
    const int g = static_cast<int>(it / nb), b = g / Hkv, kh = g % Hkv;
    const int t0 = blk * qb, nt = std::min(qb, Tq - t0), rows = rep * nt;
    const int hi = past + t0 + nt, lo = window > 0 ? std::max(0, past + t0 + 1 - window) : 0, L = hi - lo;
    thread_local std::vector<float> qf, kbuf, vbuf, sc, ob, nrm;
    qf.resize(static_cast<size_t>(rows) * D);
    for (int r = 0; r < rep; ++r)
      for (int t = 0; t < nt; ++t) {  // row r * nt + t: head kh * rep + r, query t0 + t
        const T* src = qp + b * qs[0] + (kh * rep + r) * qs[1] + (t0 + t) * qs[2];
        float* dst = qf.data() + static_cast<int64_t>(r * nt + t) * D;
        for (int d = 0; d < D; ++d) dst[d] = to_f(static_cast<T>(to_f(src[d * qs[3]]) * scale));  // q * scale, as MLX
      }
    const T* kb = kp + b * ks[0] + kh * ks[1] + lo * ks[2];
    const T* vb = vp + b * vs[0] + kh * vs[1] + lo * vs[2];
    const float *kf, *vf;
    int64_t kst, vst;
    if (k_direct) {
      kf = reinterpret_cast<const float*>(kb), kst = ks[2];
    } else {
      kbuf.resize(static_cast<size_t>(L) * D);
      for (int j = 0; j < L; ++j)
        for (int d = 0; d < D; ++d) kbuf[static_cast<int64_t>(j) * D + d] = to_f(kb[j * ks[2] + d * ks[3]]);
      kf = kbuf.data(), kst = D;
    }
    if (v_direct) {
      vf = reinterpret_cast<const float*>(vb), vst = vs[2];
    } else {
      vbuf.resize(static_cast<size_t>(L) * Dv);
      for (int j = 0; j < L; ++j)
        for (int d = 0; d < Dv; ++d) vbuf[static_cast<int64_t>(j) * Dv + d] = to_f(vb[j * vs[2] + d * vs[3]]);
      vf = vbuf.data(), vst = Dv;
    }
    sc.resize(static_cast<size_t>(rows) * L);
    vo.qk_scores(qf.data(), rows, D, kf, kst, L, sc.data(), L);
    nrm.resize(rows);
    for (int r = 0; r < rep; ++r)
      for (int t = 0; t < nt; ++t) {
        const int row = r * nt + t, pos = past + t0 + t;
        const int a = (window > 0 ? std::max(0, pos + 1 - window) : 0) - lo, e = pos + 1 - lo;  // its keys [a, e)
        float* s = sc.data() + static_cast<int64_t>(row) * L;
        float m;
        nrm[row] = 1.0f / vo.softmax_numerators(s + a, e - a, &m);
        std::fill(s, s + a, 0.f);
        std::fill(s + e, s + L, 0.f);
        if constexpr (!std::is_same_v<T, float>) {  // probabilities in the dtype, as attention_run's
          for (int j = a; j < e; ++j) s[j] = to_f(static_cast<T>(s[j] * nrm[row]));
          nrm[row] = 1.f;
        }  // float32 scales the sums instead (the same up to rounding, L times fewer products)
      }
    ob.resize(static_cast<size_t>(rows) * Dv);
    vo.pv_accumulate(sc.data(), L, rows, L, vf, vst, Dv, ob.data());
    for (int r = 0; r < rep; ++r)
      for (int t = 0; t < nt; ++t) {
        const int row = r * nt + t;
        const float* o = ob.data() + static_cast<int64_t>(row) * Dv;
        T* dst = op + ((static_cast<int64_t>(b) * Hq + kh * rep + r) * Tq + t0 + t) * Dv;
        for (int d = 0; d < Dv; ++d) dst[d] = static_cast<T>(o[d] * nrm[row]);
      }
  };
  if (parallel && items > 1)
    parallel_for(items, threads, item);
  else
    for (int64_t i = 0; i < items; ++i) item(i);
}

// ------------------------------------------------------------------------------------------------ fused decode step

struct QkvDecodeArgs {
  int offset, hq, hkv, d, dims;
  bool traditional;
  float scale;
  int window;
};

// Copy a [B, H, C, D] cache (any strides) into a fresh row-contiguous buffer.
template <typename T>
void copy_cache(const mx::array& in, mx::array& out) {
  const T* ip = in.data<T>();
  T* op = out.data<T>();
  if (in.flags().row_contiguous) {
    std::memcpy(op, ip, in.nbytes());
    return;
  }
  const auto& sh = in.shape();
  const auto& st = in.strides();
  for (int b = 0; b < sh[0]; ++b)
    for (int h = 0; h < sh[1]; ++h)
      for (int c = 0; c < sh[2]; ++c) {
        const T* src = ip + b * st[0] + h * st[1] + c * st[2];
        for (int d = 0; d < sh[3]; ++d) *op++ = src[d * st[3]];
      }
}

// kout and vout are row-contiguous [B, Hkv, C, D] (donated input buffers or fresh ones); out is [B, 1, Hq D].
template <typename T>
void qkv_decode_run(const mx::array& qkv, const mx::array& kin, const mx::array& vin, const mx::array& freqs,
                    const QkvDecodeArgs& a, bool k_inplace, bool v_inplace, mx::array& out, mx::array& kout,
                    mx::array& vout) {
  if (!k_inplace) copy_cache<T>(kin, kout);
  if (!v_inplace) copy_cache<T>(vin, vout);
  const int B = qkv.shape(0), Hq = a.hq, Hkv = a.hkv, D = a.d, C = kout.shape(2), half = a.dims / 2;
  const int rep = Hq / Hkv, offset = a.offset;
  const int64_t sb = qkv.strides()[0], sf = qkv.strides()[2];
  const T* xp = qkv.data<T>();
  T* kp = kout.data<T>();
  T* vp = vout.data<T>();
  T* op = out.data<T>();
  const VecOps& vo = vec_ops();

  // Rotation at position `offset`, with cos and sin rounded to the dtype as rope_run does.
  std::vector<float> cs(half), sn(half), row(D), rot(D);
  const float* fp = freqs.data<float>();
  for (int i = 0; i < half; ++i) {
    const float theta = static_cast<float>(offset) * (1.0f / fp[i]);
    cs[i] = to_f(static_cast<T>(std::cos(theta)));
    sn[i] = to_f(static_cast<T>(std::sin(theta)));
  }
  auto load_head = [&](int b, int head) {  // head index counts q, then k, then v heads
    const T* src = xp + b * sb + static_cast<int64_t>(head) * D * sf;
    for (int d = 0; d < D; ++d) row[d] = to_f(src[d * sf]);
  };
  auto rotate = [&]() {  // rot = rope(row), unrounded (rope_run's arithmetic)
    if (a.traditional) {
      for (int i = 0; i < half; ++i) {
        const float x1 = row[2 * i], x2 = row[2 * i + 1];
        rot[2 * i] = x1 * cs[i] - x2 * sn[i];
        rot[2 * i + 1] = x1 * sn[i] + x2 * cs[i];
      }
    } else {
      for (int i = 0; i < half; ++i) {
        const float x1 = row[i], x2 = row[i + half];
        rot[i] = x1 * cs[i] - x2 * sn[i];
        rot[i + half] = x1 * sn[i] + x2 * cs[i];
      }
    }
    for (int d = a.dims; d < D; ++d) rot[d] = row[d];
  };

  // Queries (rotated, in the dtype, times scale in the dtype: attention_run's q) and the cache writes.
  std::vector<float> qs(static_cast<size_t>(B) * Hq * D);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < Hq; ++h) {
      load_head(b, h);
      rotate();
      float* q = qs.data() + (static_cast<int64_t>(b) * Hq + h) * D;
      for (int d = 0; d < D; ++d) q[d] = to_f(static_cast<T>(to_f(static_cast<T>(rot[d])) * a.scale));
    }
    for (int kh = 0; kh < Hkv; ++kh) {
      const int64_t at = ((static_cast<int64_t>(b) * Hkv + kh) * C + offset) * D;
      load_head(b, Hq + kh);
      rotate();
      for (int d = 0; d < D; ++d) kp[at + d] = static_cast<T>(rot[d]);
      const T* src = xp + b * sb + static_cast<int64_t>(Hq + Hkv + kh) * D * sf;
      for (int d = 0; d < D; ++d) vp[at + d] = src[d * sf];
    }
  }

  // Attention over positions start .. offset, one kv head's `rep` query heads at a time. A large float32 call
  // also splits the keys into chunks, so that both threads get equal work (3 kv heads do not split over 2
  // threads); chunks combine by their softmax maxima and sums. Half precision keeps one chunk per head, so that
  // its probabilities round to the dtype after normalization, as attention_run's do.
  const int start = a.window > 0 ? std::max(0, offset + 1 - a.window) : 0, L = offset + 1 - start;
  const int groups = B * Hkv;
  const int threads = get_threads();
  const bool parallel =
      threads > 1 && static_cast<int64_t>(B) * Hq * L * 2 * D >= tuning().parallel_min_work;
  int nc = 1;
  if (parallel && std::is_same_v<T, float>)
    nc = std::max(1, std::min((2 * threads + groups - 1) / groups, L / 64));
  const int64_t items = static_cast<int64_t>(groups) * nc;
  std::vector<float> part, mpart, lpart;  // per chunk: unnormalized outputs [rep, D], maxima and sums [rep]
  if (nc > 1) {
    part.resize(items * rep * D);
    mpart.resize(items * rep);
    lpart.resize(items * rep);
  }
  auto item = [&](int64_t it) {
    const int g = static_cast<int>(it / nc), c = static_cast<int>(it % nc), b = g / Hkv, kh = g % Hkv;
    const int j0 = start + static_cast<int>(static_cast<int64_t>(L) * c / nc);
    const int len = start + static_cast<int>(static_cast<int64_t>(L) * (c + 1) / nc) - j0;
    const float* q = qs.data() + (static_cast<int64_t>(b) * Hq + kh * rep) * D;
    const int64_t base = ((static_cast<int64_t>(b) * Hkv + kh) * C + j0) * D;
    thread_local std::vector<float> kbuf, vbuf, sc, ob, nrm;
    const float *kf, *vf;
    if constexpr (std::is_same_v<T, float>) {
      kf = kp + base;
      vf = vp + base;
    } else {
      kbuf.resize(static_cast<size_t>(len) * D);
      vbuf.resize(static_cast<size_t>(len) * D);
      for (int64_t i = 0; i < static_cast<int64_t>(len) * D; ++i) {
        kbuf[i] = to_f(kp[base + i]);
        vbuf[i] = to_f(vp[base + i]);
      }
      kf = kbuf.data();
      vf = vbuf.data();
    }
    sc.resize(static_cast<size_t>(rep) * len);
    vo.qk_scores(q, rep, D, kf, D, len, sc.data(), len);
    float* o;
    if (nc == 1) {
      nrm.resize(rep);
      for (int r = 0; r < rep; ++r) {
        float m;
        float* s = sc.data() + static_cast<int64_t>(r) * len;
        nrm[r] = 1.0f / vo.softmax_numerators(s, len, &m);
        if constexpr (!std::is_same_v<T, float>) {  // probabilities in the dtype, as attention_run's
          for (int j = 0; j < len; ++j) s[j] = to_f(static_cast<T>(s[j] * nrm[r]));
          nrm[r] = 1.f;
        }  // float32 scales the sums instead (the same up to rounding, L times fewer products)
      }
      ob.resize(static_cast<size_t>(rep) * D);
      o = ob.data();
    } else {
      for (int r = 0; r < rep; ++r)
        lpart[it * rep + r] =
            vo.softmax_numerators(sc.data() + static_cast<int64_t>(r) * len, len, &mpart[it * rep + r]);
      o = part.data() + it * rep * D;
    }
    vo.pv_accumulate(sc.data(), len, rep, len, vf, D, D, o);
    if (nc == 1) {
      T* dst = op + (static_cast<int64_t>(b) * Hq + kh * rep) * D;
      for (int r = 0; r < rep; ++r)
        for (int d = 0; d < D; ++d) dst[r * D + d] = static_cast<T>(o[r * D + d] * nrm[r]);
    }
  };
  if (parallel && items > 1)
    parallel_for(items, threads, item);
  else
    for (int64_t i = 0; i < items; ++i) item(i);
  if (nc > 1) {
    for (int g = 0; g < groups; ++g)
      for (int r = 0; r < rep; ++r) {
        float m = -std::numeric_limits<float>::infinity(), den = 0.f;
        for (int c = 0; c < nc; ++c) m = std::max(m, mpart[(static_cast<int64_t>(g) * nc + c) * rep + r]);
        std::vector<float> w(nc);
        for (int c = 0; c < nc; ++c) {
          const int64_t k = (static_cast<int64_t>(g) * nc + c) * rep + r;
          w[c] = std::exp(mpart[k] - m);
          den += w[c] * lpart[k];
        }
        const int b = g / Hkv, h = (g % Hkv) * rep + r;
        T* dst = op + (static_cast<int64_t>(b) * Hq + h) * D;
        for (int d = 0; d < D; ++d) {
          float acc = 0.f;
          for (int c = 0; c < nc; ++c) acc += w[c] * part[((static_cast<int64_t>(g) * nc + c) * rep + r) * D + d];
          dst[d] = static_cast<T>(acc / den);
        }
      }
  }
}

// Every output of a multi-output primitive holds its own copy of the input list (mx::array::make_arrays), so an
// input nobody else holds still has one reference per output and is_donatable() (one reference) never holds. The
// outputs other than the one being evaluated drop their copies here, as array::detach drops all of them once this
// evaluation is over. Not for tracers (transformations still walk their graph; MLX does not donate them either),
// nor if `inputs` is not one of the outputs' own lists.
void release_sibling_inputs(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int own = 0;
  for (auto& o : outputs) {
    if (o.is_tracer()) return;
    own += &o.inputs() == &inputs;
  }
  if (own != 1) return;
  for (auto& o : outputs)
    if (&o.inputs() != &inputs) o.inputs().clear();
}

// ------------------------------------------------------------------------------------------------ glu

template <typename T>
void glu_run(const mx::array& x, bool gelu, mx::array& out) {
  const int nd = x.ndim();
  const int64_t n2 = x.shape(-1), n = n2 / 2, rows = n2 > 0 ? static_cast<int64_t>(x.size()) / n2 : 0;
  const auto& sh = x.shape();
  const auto& st = x.strides();
  const int64_t sl = st[nd - 1];
  const bool contiguous = x.flags().row_contiguous;
  const T* xp = x.data<T>();
  T* op = out.data<T>();
  const VecOps& vo = vec_ops();
  auto row_ptr = [&](int64_t r) {
    if (contiguous) return xp + r * n2;
    int64_t loc = 0;
    for (int i = nd - 2; i >= 0; --i) {
      loc += (r % sh[i]) * st[i];
      r /= sh[i];
    }
    return xp + loc;
  };
  auto rows_of = [&](int64_t r0, int64_t r1) {
    constexpr int64_t kBlock = 512;
    float ab[2 * kBlock], yb[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = row_ptr(r);
      T* yr = op + r * n;
      if constexpr (std::is_same_v<T, float>) {
        if (sl == 1) {
          vo.glu(xr, xr + n, yr, n, gelu);
          continue;
        }
      }
      for (int64_t c = 0; c < n; c += kBlock) {
        const int64_t m = std::min(kBlock, n - c);
        for (int64_t i = 0; i < m; ++i) ab[i] = to_f(xr[(c + i) * sl]), ab[kBlock + i] = to_f(xr[(n + c + i) * sl]);
        vo.glu(ab, ab + kBlock, yb, m, gelu);
        for (int64_t i = 0; i < m; ++i) yr[c + i] = static_cast<T>(yb[i]);
      }
    }
  };
  // Prefill-sized inputs over threads, by blocks of rows; a decode step's row stays on this thread.
  const int threads = get_threads();
  if (threads > 1 && rows > 1 && rows * n * 16 >= tuning().parallel_min_work) {
    const int64_t chunks = std::min<int64_t>(rows, static_cast<int64_t>(threads) * 4);
    parallel_for(chunks, threads, [&](int64_t c) { rows_of(rows * c / chunks, rows * (c + 1) / chunks); });
  } else {
    rows_of(0, rows);
  }
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

// --------------------------------------------------------------------------------------------------- attention, T >= 1

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, int window,
                    mx::StreamOrDevice s) {
  const char* op = "mlxc.attention";
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    fail(op, "q must be [B, Hq, T, D] and k, v [B, Hkv, S, D] arrays");
  if (!is_float(q.dtype()) || k.dtype() != q.dtype() || v.dtype() != q.dtype())
    fail(op, "q, k and v must share one dtype: float32, float16 or bfloat16");
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) || k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2))
    fail(op, "k and v must be [B, Hkv, S, D] like each other and q's batch");
  if (k.shape(3) != q.shape(3)) fail(op, "q and k head dims differ");
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0) fail(op, "query heads must be a multiple of key heads");
  if (k.shape(2) < q.shape(2) || k.shape(2) == 0)
    fail(op, "S = " + std::to_string(k.shape(2)) + " keys, fewer than T = " + std::to_string(q.shape(2)) +
                 " queries (the keys must include the queries' own positions, last)");
  if (window < 0) fail(op, "window must be 0 (all positions) or positive");
  mx::Shape shape = q.shape();
  shape[3] = v.shape(3);
  return mx::array(std::move(shape), q.dtype(), std::make_shared<AttentionPrim>(cpu_stream(s), scale, window),
                   {q, k, v});
}

void AttentionPrim::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare_output(out, inputs, stream());
  mx::cpu::get_command_encoder(stream()).dispatch(
      [q = mx::array::unsafe_weak_copy(inputs[0]), k = mx::array::unsafe_weak_copy(inputs[1]),
       v = mx::array::unsafe_weak_copy(inputs[2]), out = mx::array::unsafe_weak_copy(out), scale = scale_,
       window = window_]() mutable {
        auto run = [&](auto tag) {
          using T = decltype(tag);
          // float32 decode too goes through the blocked kernel (vectorized, K and V read once per query group: 2-3x
          // faster than attention_decode's loop); half precision keeps attention_decode's rounding
          if (q.shape(2) == 1 && !std::is_same_v<T, float>) attention_run<T>(q, k, v, scale, window, out);
          else prefill_run<T>(q, k, v, scale, window, out);
        };
        if (q.dtype() == mx::float32) run(float{});
        else if (q.dtype() == mx::float16) run(mx::float16_t{});
        else run(mx::bfloat16_t{});
      });
}

void AttentionPrim::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcAttention] has no GPU implementation");
}

std::vector<mx::Shape> AttentionPrim::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  shape[3] = inputs[2].shape(3);
  return {shape};
}

std::vector<mx::array> AttentionPrim::vjp(const std::vector<mx::array>& primals,
                                          const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                          const std::vector<mx::array>&) {
  const float scale = scale_;
  const int window = window_;
  const mx::Stream st = stream();
  return reference_vjp([=](const std::vector<mx::array>& in) {
    const int T = in[0].shape(2), S = in[1].shape(2);
    if (window > 0 && window < S) {  // a window shorter than the keys: MLX's boolean mask 0 <= pos - j < window
      const mx::array d = mx::subtract(mx::expand_dims(mx::arange(S - T, S, mx::int32, st), 1, st),
                                       mx::expand_dims(mx::arange(0, S, mx::int32, st), 0, st), st);
      const mx::array mask = mx::logical_and(mx::greater_equal(d, mx::array(0), st),
                                             mx::less(d, mx::array(window), st), st);
      return std::vector<mx::array>{
          mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], scale, "array", mask, {}, false, st)};
    }
    return std::vector<mx::array>{
        mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], scale, "causal", {}, {}, false, st)};
  }, primals, cotangents, argnums);
}

bool AttentionPrim::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AttentionPrim&>(other);
  return scale_ == o.scale_ && window_ == o.window_;
}

// ---------------------------------------------------------------------------------------------------- fused decode

std::tuple<mx::array, mx::array, mx::array> attention_qkv_decode(
    const mx::array& qkv, const mx::array& k_cache, const mx::array& v_cache, const mx::array& freqs, int offset,
    int q_heads, int kv_heads, int head_dim, int rope_dims, bool traditional, float scale, int window,
    mx::StreamOrDevice s) {
  const char* op = "mlxc.attention_qkv_decode";
  if (q_heads <= 0 || kv_heads <= 0 || head_dim <= 0) fail(op, "q_heads, kv_heads and head_dim must be positive");
  if (q_heads % kv_heads != 0) fail(op, "q_heads must be a multiple of kv_heads");
  if (qkv.ndim() != 3 || qkv.shape(1) != 1 || !is_float(qkv.dtype()))
    fail(op, "qkv must be a [B, 1, (q_heads + 2 kv_heads) head_dim] float32, float16 or bfloat16 array (one token)");
  const int64_t features = static_cast<int64_t>(q_heads + 2 * kv_heads) * head_dim;
  if (qkv.shape(2) != features)
    fail(op, "qkv has " + std::to_string(qkv.shape(2)) + " features, but (q_heads + 2 kv_heads) head_dim = " +
                 std::to_string(features));
  if (k_cache.ndim() != 4 || k_cache.shape(0) != qkv.shape(0) || k_cache.shape(1) != kv_heads ||
      k_cache.shape(3) != head_dim || v_cache.shape() != k_cache.shape())
    fail(op, "k_cache and v_cache must both be [B, kv_heads, C, head_dim] with qkv's B");
  if (k_cache.dtype() != qkv.dtype() || v_cache.dtype() != qkv.dtype())
    fail(op, "k_cache and v_cache must have qkv's dtype");
  const int C = k_cache.shape(2);
  if (offset < 0 || offset >= C)
    fail(op, "offset " + std::to_string(offset) + " is outside the cache (capacity " + std::to_string(C) + ")");
  if (rope_dims <= 0 || rope_dims % 2 != 0 || rope_dims > head_dim)
    fail(op, "rope_dims must be even, positive and at most head_dim");
  if (freqs.ndim() != 1 || freqs.shape(0) != rope_dims / 2) fail(op, "freqs must be a vector of rope_dims / 2 entries");
  if (window < 0) fail(op, "window must be 0 (all positions) or positive");
  const mx::Stream st = cpu_stream(s);
  const mx::Dtype dt = qkv.dtype();
  auto outs = mx::array::make_arrays(
      {mx::Shape{qkv.shape(0), 1, q_heads * head_dim}, k_cache.shape(), v_cache.shape()}, {dt, dt, dt},
      std::make_shared<AttentionQkvDecodePrim>(st, offset, q_heads, kv_heads, head_dim, rope_dims, traditional, scale,
                                               window),
      {qkv, k_cache, v_cache, mx::astype(freqs, mx::float32, st)});
  return {outs[0], outs[1], outs[2]};
}

void AttentionQkvDecodePrim::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
  // The caches are written in place when their buffers may be donated (as MLX's SliceUpdate does), else copied.
  release_sibling_inputs(inputs, outputs);
  bool inplace[2];
  for (int i = 0; i < 2; ++i) {
    const mx::array& in = inputs[1 + i];
    mx::array& o = outputs[1 + i];
    inplace[i] = in.flags().row_contiguous && mx::is_donatable(in, o);
    if (inplace[i]) o.copy_shared_buffer(in);
    else o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  for (const auto& a : inputs) enc.set_input_array(a);
  for (auto& o : outputs) enc.set_output_array(o);
  std::vector<mx::array> ins, outs;
  for (const auto& a : inputs) ins.push_back(mx::array::unsafe_weak_copy(a));
  for (const auto& o : outputs) outs.push_back(mx::array::unsafe_weak_copy(o));
  const QkvDecodeArgs args{offset_, q_heads_, kv_heads_, head_dim_, rope_dims_, traditional_, scale_, window_};
  enc.dispatch([ins = std::move(ins), outs = std::move(outs), args, kin = inplace[0], vin = inplace[1]]() mutable {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      qkv_decode_run<T>(ins[0], ins[1], ins[2], ins[3], args, kin, vin, outs[0], outs[1], outs[2]);
    };
    const mx::Dtype dt = ins[0].dtype();
    if (dt == mx::float32) run(float{});
    else if (dt == mx::float16) run(mx::float16_t{});
    else run(mx::bfloat16_t{});
  });
}

void AttentionQkvDecodePrim::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[MlxcAttentionQkvDecode] has no GPU implementation");
}

std::vector<mx::array> AttentionQkvDecodePrim::vjp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                                                   const std::vector<int>&, const std::vector<mx::array>&) {
  throw std::invalid_argument(
      "[mlxc.attention_qkv_decode] has no gradient: it is a decode-step op (differentiate the composed attention)");
}

std::vector<mx::Shape> AttentionQkvDecodePrim::output_shapes(const std::vector<mx::array>& inputs) {
  return {mx::Shape{inputs[0].shape(0), 1, q_heads_ * head_dim_}, inputs[1].shape(), inputs[2].shape()};
}

bool AttentionQkvDecodePrim::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AttentionQkvDecodePrim&>(other);
  return offset_ == o.offset_ && q_heads_ == o.q_heads_ && kv_heads_ == o.kv_heads_ && head_dim_ == o.head_dim_ &&
         rope_dims_ == o.rope_dims_ && traditional_ == o.traditional_ && scale_ == o.scale_ && window_ == o.window_;
}

// ---------------------------------------------------------------------------------------------------- glu

mx::array glu(const mx::array& x, const std::string& activation, mx::StreamOrDevice s) {
  const char* op = "mlxc.glu";
  GluPrim::Activation act;
  if (activation == "silu") act = GluPrim::kSilu;
  else if (activation == "gelu_tanh") act = GluPrim::kGeluTanh;
  else fail(op, "activation must be 'silu' or 'gelu_tanh', got '" + activation + "'");
  if (x.ndim() < 1 || !is_float(x.dtype())) fail(op, "x must be a float32, float16 or bfloat16 array");
  if (x.shape(-1) % 2 != 0) fail(op, "x's last axis must have an even length (the two halves act(a) and b)");
  mx::Shape shape = x.shape();
  shape.back() /= 2;
  return mx::array(std::move(shape), x.dtype(), std::make_shared<GluPrim>(cpu_stream(s), act), {x});
}

void GluPrim::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare_output(out, inputs, stream());
  mx::cpu::get_command_encoder(stream()).dispatch(
      [x = mx::array::unsafe_weak_copy(inputs[0]), out = mx::array::unsafe_weak_copy(out),
       gelu = act_ == kGeluTanh]() mutable {
        if (x.dtype() == mx::float32) glu_run<float>(x, gelu, out);
        else if (x.dtype() == mx::float16) glu_run<mx::float16_t>(x, gelu, out);
        else glu_run<mx::bfloat16_t>(x, gelu, out);
      });
}

void GluPrim::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[MlxcGlu] has no GPU implementation");
}

std::vector<mx::Shape> GluPrim::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  shape.back() /= 2;
  return {shape};
}

std::vector<mx::array> GluPrim::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const bool gelu = act_ == kGeluTanh;
  const mx::Stream st = stream();
  return reference_vjp([gelu, st](const std::vector<mx::array>& in) {
    const mx::Dtype dt = in[0].dtype();
    const mx::array x = dt == mx::float32 ? in[0] : mx::astype(in[0], mx::float32, st);  // float32, as the kernel
    const auto halves = mx::split(x, 2, -1, st);
    const mx::array& a = halves[0];
    mx::array g = mx::multiply(a, mx::sigmoid(a, st), st);  // nn.silu
    if (gelu) {  // nn.gelu_approx
      const mx::array cube = mx::multiply(mx::multiply(a, a, st), a, st);
      const mx::array u = mx::multiply(mx::array(0.7978845608028654f),
                                       mx::add(a, mx::multiply(mx::array(0.044715f), cube, st), st), st);
      g = mx::multiply(mx::multiply(mx::array(0.5f), a, st), mx::add(mx::array(1.0f), mx::tanh(u, st), st), st);
    }
    mx::array y = mx::multiply(g, halves[1], st);
    return std::vector<mx::array>{dt == mx::float32 ? y : mx::astype(y, dt, st)};
  }, primals, cotangents, argnums);
}

bool GluPrim::is_equivalent(const mx::Primitive& other) const {
  return act_ == static_cast<const GluPrim&>(other).act_;
}

}  // namespace mlxc_native
