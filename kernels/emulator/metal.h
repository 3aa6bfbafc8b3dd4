// Metal, as much of it as MLX kernels use, for g++ on the CPU: the prelude of every emulated kernel.
//
// It stands in for two things a Mac puts in front of a custom kernel's source: the Metal standard library and
// MLX's utilities prelude (metal::utils(): `using namespace metal`, float16_t/bfloat16_t, Limits, elem_to_loc,
// ceildiv, log1p). Compiled with -std=c++20 -fsingle-precision-constant (Metal has no double: 1.0 is a float).
// <cmath> is deliberately absent: unqualified exp/max/... must resolve to the Metal versions below.
//
// Not modelled: textures, samplers, matrices, swizzles (v.xy), packed_* types, simdgroup_matrix, double,
// function constants, and quad functions outside SIMD-uniform control flow (quad calls synchronise the whole
// SIMD-group here).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <source_location>
#include <type_traits>
#include <utility>

#include "mlxc_rt.h"

#ifndef MLXC_SHUFFLE_EDGE_POISON  // emulator.py, Choices.shuffle_edge
#define MLXC_SHUFFLE_EDGE_POISON 0
#endif

// ------------------------------------------------------------------------------------------------ scalar types

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

struct bfloat {
  uint16_t bits_;
  static constexpr uint16_t round(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7FFFu + ((u >> 16) & 1u);                                                        // to nearest even
    return static_cast<uint16_t>(u >> 16);
  }
  bfloat() = default;
  template <class T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_same_v<T, _Float16>, int> = 0>
  constexpr bfloat(T v) : bits_(round(static_cast<float>(v))) {}
  constexpr operator float() const { return __builtin_bit_cast(float, static_cast<uint32_t>(bits_) << 16); }
};

template <class T>
inline constexpr bool mlxc_is_num = std::is_arithmetic_v<T> || std::is_same_v<T, _Float16>;

// bfloat with bfloat or an integer stays bfloat; with a float (or half) it becomes float, as in Metal.
#define MLXC_BF_OP(op)                                                                                         \
  inline bfloat operator op(bfloat a, bfloat b) { return bfloat(float(a) op float(b)); }                       \
  template <class U, std::enable_if_t<std::is_integral_v<U>, int> = 0>                                         \
  inline bfloat operator op(bfloat a, U b) { return bfloat(float(a) op float(b)); }                            \
  template <class U, std::enable_if_t<std::is_integral_v<U>, int> = 0>                                         \
  inline bfloat operator op(U a, bfloat b) { return bfloat(float(a) op float(b)); }                            \
  template <class U, std::enable_if_t<mlxc_is_num<U> && !std::is_integral_v<U>, int> = 0>                      \
  inline float operator op(bfloat a, U b) { return float(a) op float(b); }                                     \
  template <class U, std::enable_if_t<mlxc_is_num<U> && !std::is_integral_v<U>, int> = 0>                      \
  inline float operator op(U a, bfloat b) { return float(a) op float(b); }                                     \
  template <class U, std::enable_if_t<mlxc_is_num<U> || std::is_same_v<U, bfloat>, int> = 0>                  \
  inline bfloat& operator op##=(bfloat & a, U b) { return a = bfloat(float(a) op float(b)); }
MLXC_BF_OP(+)
MLXC_BF_OP(-)
MLXC_BF_OP(*)
MLXC_BF_OP(/)
#undef MLXC_BF_OP
#define MLXC_BF_CMP(op)                                                                                        \
  inline bool operator op(bfloat a, bfloat b) { return float(a) op float(b); }                                 \
  template <class U, std::enable_if_t<mlxc_is_num<U>, int> = 0>                                                \
  inline bool operator op(bfloat a, U b) { return float(a) op float(b); }                                      \
  template <class U, std::enable_if_t<mlxc_is_num<U>, int> = 0>                                                \
  inline bool operator op(U a, bfloat b) { return float(a) op float(b); }
MLXC_BF_CMP(<)
MLXC_BF_CMP(>)
MLXC_BF_CMP(<=)
MLXC_BF_CMP(>=)
MLXC_BF_CMP(==)
MLXC_BF_CMP(!=)
#undef MLXC_BF_CMP
inline bfloat operator-(bfloat a) { bfloat r = a; r.bits_ ^= 0x8000u; return r; }
inline bfloat operator+(bfloat a) { return a; }

namespace std {
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true, is_signed = true, has_infinity = true, has_quiet_NaN = true;
  static constexpr bfloat from_bits(uint16_t b) { bfloat r{}; r.bits_ = b; return r; }
  static constexpr bfloat min() { return from_bits(0x0080); }
  static constexpr bfloat max() { return from_bits(0x7F7F); }
  static constexpr bfloat lowest() { return from_bits(0xFF7F); }
  static constexpr bfloat epsilon() { return from_bits(0x3C00); }
  static constexpr bfloat infinity() { return from_bits(0x7F80); }
  static constexpr bfloat quiet_NaN() { return from_bits(0x7FC0); }
};
#if !defined(__STDCPP_FLOAT16_T__)
template <>
struct numeric_limits<_Float16> {
  static constexpr bool is_specialized = true, is_signed = true, has_infinity = true, has_quiet_NaN = true;
  static constexpr _Float16 from_bits(uint16_t b) { return __builtin_bit_cast(_Float16, b); }
  static constexpr _Float16 min() { return from_bits(0x0400); }
  static constexpr _Float16 max() { return from_bits(0x7BFF); }
  static constexpr _Float16 lowest() { return from_bits(0xFBFF); }
  static constexpr _Float16 epsilon() { return from_bits(0x1400); }
  static constexpr _Float16 infinity() { return from_bits(0x7C00); }
  static constexpr _Float16 quiet_NaN() { return from_bits(0x7E00); }
};
#endif
}  // namespace std

// ------------------------------------------------------------------------------------------------ vector types

template <class T, int N>
struct mlxc_vec_base;
template <class T>
struct alignas(2 * sizeof(T)) mlxc_vec_base<T, 2> { T x, y; };
template <class T>
struct alignas(4 * sizeof(T)) mlxc_vec_base<T, 3> { T x, y, z; };
template <class T>
struct alignas(4 * sizeof(T)) mlxc_vec_base<T, 4> { T x, y, z, w; };

template <class T, int N>
struct vec : mlxc_vec_base<T, N> {
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
  vec() = default;
  template <class U, std::enable_if_t<mlxc_is_num<U> || std::is_same_v<U, bfloat>, int> = 0>
  vec(U s) { for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>(s); }
  template <class... U, std::enable_if_t<sizeof...(U) == N && (sizeof...(U) > 1), int> = 0>
  vec(U... v) {
    T tmp[N] = {static_cast<T>(v)...};
    for (int i = 0; i < N; ++i) (*this)[i] = tmp[i];
  }
  template <class U>
  explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>(o[i]); }
};

#define MLXC_VEC_OP(op)                                                                                        \
  template <class T, int N>                                                                                    \
  inline vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) {                                              \
    for (int i = 0; i < N; ++i) a[i] = a[i] op b[i];                                                           \
    return a;                                                                                                  \
  }                                                                                                            \
  template <class T, int N, class U, std::enable_if_t<mlxc_is_num<U> || std::is_same_v<U, bfloat>, int> = 0>  \
  inline vec<T, N> operator op(vec<T, N> a, U b) {                                                             \
    for (int i = 0; i < N; ++i) a[i] = a[i] op static_cast<T>(b);                                              \
    return a;                                                                                                  \
  }                                                                                                            \
  template <class T, int N, class U, std::enable_if_t<mlxc_is_num<U> || std::is_same_v<U, bfloat>, int> = 0>  \
  inline vec<T, N> operator op(U a, vec<T, N> b) {                                                             \
    for (int i = 0; i < N; ++i) b[i] = static_cast<T>(a) op b[i];                                             \
    return b;                                                                                                  \
  }                                                                                                            \
  template <class T, int N, class U>                                                                           \
  inline vec<T, N>& operator op##=(vec<T, N>& a, const U& b) { return a = a op b; }
MLXC_VEC_OP(+)
MLXC_VEC_OP(-)
MLXC_VEC_OP(*)
MLXC_VEC_OP(/)
#undef MLXC_VEC_OP
template <class T, int N>
inline vec<T, N> operator-(vec<T, N> a) {
  for (int i = 0; i < N; ++i) a[i] = -a[i];
  return a;
}

#define MLXC_VEC_TYPES(T, name)                                                                                \
  typedef vec<T, 2> name##2;                                                                                   \
  typedef vec<T, 3> name##3;                                                                                   \
  typedef vec<T, 4> name##4;
MLXC_VEC_TYPES(float, float)
MLXC_VEC_TYPES(half, half)
MLXC_VEC_TYPES(bfloat, bfloat)
MLXC_VEC_TYPES(int, int)
MLXC_VEC_TYPES(uint, uint)
MLXC_VEC_TYPES(short, short)
MLXC_VEC_TYPES(ushort, ushort)
MLXC_VEC_TYPES(char, char)
MLXC_VEC_TYPES(uchar, uchar)
MLXC_VEC_TYPES(long, long)
MLXC_VEC_TYPES(ulong, ulong)
MLXC_VEC_TYPES(bool, bool)
#undef MLXC_VEC_TYPES

// ------------------------------------------------------------------------------------------------ math

#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define HUGE_VALF (__builtin_huge_valf())
#define MAXFLOAT (__FLT_MAX__)
#define FLT_MAX (__FLT_MAX__)
#define FLT_MIN (__FLT_MIN__)
#define FLT_EPSILON (__FLT_EPSILON__)
#define M_PI_F 3.14159265358979323846f
#define M_LN2_F 0.69314718055994530942f
#define M_LOG2E_F 1.44269504088896340736f
#define M_SQRT2_F 1.41421356237309504880f

namespace metal {

template <class T>
using numeric_limits = std::numeric_limits<T>;

#define MLXC_UNARY(name, expr)                                                                                 \
  inline float name(float x) { return expr; }                                                                  \
  inline half name(half x) { return static_cast<half>(name(static_cast<float>(x))); }                         \
  inline bfloat name(bfloat x) { return bfloat(name(static_cast<float>(x))); }                                \
  template <class T, int N>                                                                                    \
  inline vec<T, N> name(vec<T, N> v) {                                                                         \
    for (int i = 0; i < N; ++i) v[i] = name(v[i]);                                                             \
    return v;                                                                                                  \
  }
MLXC_UNARY(exp, __builtin_expf(x))
MLXC_UNARY(exp2, __builtin_exp2f(x))
MLXC_UNARY(exp10, __builtin_powf(10.0f, x))
MLXC_UNARY(log, __builtin_logf(x))
MLXC_UNARY(log2, __builtin_log2f(x))
MLXC_UNARY(log10, __builtin_log10f(x))
MLXC_UNARY(sqrt, __builtin_sqrtf(x))
MLXC_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MLXC_UNARY(sin, __builtin_sinf(x))
MLXC_UNARY(cos, __builtin_cosf(x))
MLXC_UNARY(tan, __builtin_tanf(x))
MLXC_UNARY(asin, __builtin_asinf(x))
MLXC_UNARY(acos, __builtin_acosf(x))
MLXC_UNARY(atan, __builtin_atanf(x))
MLXC_UNARY(sinh, __builtin_sinhf(x))
MLXC_UNARY(cosh, __builtin_coshf(x))
MLXC_UNARY(tanh, __builtin_tanhf(x))
MLXC_UNARY(floor, __builtin_floorf(x))
MLXC_UNARY(ceil, __builtin_ceilf(x))
MLXC_UNARY(round, __builtin_roundf(x))
MLXC_UNARY(rint, __builtin_rintf(x))
MLXC_UNARY(trunc, __builtin_truncf(x))
MLXC_UNARY(fract, x - __builtin_floorf(x))
MLXC_UNARY(fabs, __builtin_fabsf(x))
MLXC_UNARY(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f)))
MLXC_UNARY(saturate, (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)))
#undef MLXC_UNARY

inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return static_cast<half>(__builtin_fabsf(static_cast<float>(x))); }
inline bfloat abs(bfloat x) { return bfloat(__builtin_fabsf(static_cast<float>(x))); }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T abs(T x) { return x < 0 ? T(-x) : x; }
template <class T, int N>
inline vec<T, N> abs(vec<T, N> v) {
  for (int i = 0; i < N; ++i) v[i] = abs(v[i]);
  return v;
}

// NaN handling of max/min/fmax/fmin follows IEEE fmax/fmin (the non-NaN operand wins), as Metal's do.
#define MLXC_BINARY(name, expr)                                                                                \
  inline float name(float x, float y) { return expr; }                                                         \
  inline half name(half x, half y) { return static_cast<half>(name(static_cast<float>(x), static_cast<float>(y))); } \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(name(static_cast<float>(x), static_cast<float>(y))); } \
  template <class T, int N>                                                                                    \
  inline vec<T, N> name(vec<T, N> a, const vec<T, N>& b) {                                                     \
    for (int i = 0; i < N; ++i) a[i] = name(a[i], b[i]);                                                       \
    return a;                                                                                                  \
  }
MLXC_BINARY(max, __builtin_fmaxf(x, y))
MLXC_BINARY(min, __builtin_fminf(x, y))
MLXC_BINARY(fmax, __builtin_fmaxf(x, y))
MLXC_BINARY(fmin, __builtin_fminf(x, y))
MLXC_BINARY(pow, __builtin_powf(x, y))
MLXC_BINARY(powr, __builtin_powf(x, y))
MLXC_BINARY(fmod, __builtin_fmodf(x, y))
MLXC_BINARY(atan2, __builtin_atan2f(x, y))
MLXC_BINARY(copysign, __builtin_copysignf(x, y))
MLXC_BINARY(fdim, __builtin_fdimf(x, y))
MLXC_BINARY(step, (y < x ? 0.0f : 1.0f))
MLXC_BINARY(divide, x / y)
#undef MLXC_BINARY
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T max(T a, T b) { return a > b ? a : b; }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T min(T a, T b) { return a < b ? a : b; }

template <class T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return static_cast<half>(__builtin_fmaf(a, b, c)); }
inline bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(__builtin_fmaf(a, b, c)); }
template <class T>
inline T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = a[0] * b[0];
  for (int i = 1; i < N; ++i) s += a[i] * b[i];
  return s;
}
template <class T>
inline bool isnan(T x) { return static_cast<float>(x) != static_cast<float>(x); }
template <class T>
inline bool isinf(T x) { return __builtin_isinf(static_cast<float>(x)); }
template <class T>
inline bool isfinite(T x) { return __builtin_isfinite(static_cast<float>(x)); }
template <class T>
inline bool signbit(T x) { return __builtin_signbit(static_cast<float>(x)); }

template <class T, class U>
inline T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  T r;
  std::memcpy(&r, &x, sizeof r);
  return r;
}

namespace fast {
using metal::abs, metal::clamp, metal::cos, metal::divide, metal::exp, metal::exp10, metal::exp2, metal::fabs,
    metal::floor, metal::ceil, metal::fmax, metal::fmin, metal::log, metal::log10, metal::log2, metal::max,
    metal::min, metal::pow, metal::powr, metal::rsqrt, metal::sin, metal::sqrt, metal::tan, metal::tanh,
    metal::round, metal::trunc, metal::sinh, metal::cosh, metal::atan, metal::atan2;
}
namespace precise {
using namespace fast;
}

// ------------------------------------------------------------------------------------------------ synchronisation

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
                             mem_threadgroup_imageblock = 8, mem_object_data = 16 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

#define MLXC_HERE std::source_location mlxc_loc = std::source_location::current()
#define MLXC_AT mlxc_loc.line(), mlxc_loc.column()

inline void threadgroup_barrier(mem_flags, MLXC_HERE) { mlxc_rt_threadgroup_barrier(MLXC_AT); }

// -------- SIMD-group functions: each lane deposits its value; the runtime computes once all active lanes wait.
template <class T>
inline const T& mlxc_in(const MlxcLane& l) { return *static_cast<const T*>(l.in); }
template <class T>
inline void mlxc_set(const MlxcLane& l, const T& v) { *static_cast<T*>(l.out) = v; }
template <class T>
inline T mlxc_poison(const void* p) {
  T r;
  std::memcpy(&r, p, sizeof(T) <= 64 ? sizeof(T) : 64);
  return r;
}

struct mlxc_add { template <class T> static T f(T a, T b) { return a + b; } };
struct mlxc_mul { template <class T> static T f(T a, T b) { return a * b; } };
struct mlxc_max { template <class T> static T f(T a, T b) { return max(a, b); } };
struct mlxc_min { template <class T> static T f(T a, T b) { return min(a, b); } };
struct mlxc_and { template <class T> static T f(T a, T b) { return a & b; } };
struct mlxc_or { template <class T> static T f(T a, T b) { return a | b; } };
struct mlxc_xor { template <class T> static T f(T a, T b) { return a ^ b; } };

// lanes [lo, hi) form one reduction domain: the SIMD-group (32) or a quad (4)
template <class T, class Op, int W>
void mlxc_exec_reduce(MlxcLane* L, const int* act, const void*) {
  for (int lo = 0; lo < 32; lo += W) {
    bool any = false;
    T acc{};
    for (int i = lo; i < lo + W; ++i)
      if (act[i]) { acc = any ? Op::f(acc, mlxc_in<T>(L[i])) : mlxc_in<T>(L[i]); any = true; }
    for (int i = lo; i < lo + W; ++i)
      if (act[i]) mlxc_set(L[i], acc);
  }
}
template <class T, class Op, bool Inclusive>
void mlxc_exec_prefix(MlxcLane* L, const int* act, const void*) {
  bool any = false;
  T acc{};
  for (int i = 0; i < 32; ++i) {
    if (!act[i]) continue;
    T v = mlxc_in<T>(L[i]);
    if (Inclusive) {
      acc = any ? Op::f(acc, v) : v;
      mlxc_set(L[i], acc);
    } else {
      mlxc_set(L[i], any ? acc : T(std::is_same_v<Op, mlxc_mul> ? 1 : 0));
      acc = any ? Op::f(acc, v) : v;
    }
    any = true;
  }
}
// Shuffles: MODE 0 absolute lane (arg), 1 down (lane + arg), 2 up (lane - arg), 3 xor (lane ^ arg),
// 4 rotate down, 5 rotate up, 6 broadcast first active lane. W is the domain (32 or 4).
// Out-of-range and inactive sources: see emulator.py, Choices (the same rules are spelled out there).
template <class T, int MODE, int W>
void mlxc_exec_shuffle(MlxcLane* L, const int* act, const void* poison) {
  int first = -1;
  for (int i = 0; i < 32; ++i)
    if (act[i]) { first = i; break; }
  for (int i = 0; i < 32; ++i) {
    if (!act[i]) continue;
    int base = i / W * W, r = i - base, a = static_cast<int>(L[i].arg), src = -1;
    bool keep_own = false;
    switch (MODE) {
      case 0: src = a < W ? base + a : -1; break;
      case 1: if (r + a < W) src = i + a; else keep_own = true; break;
      case 2: if (r - a >= 0) src = i - a; else keep_own = true; break;
      case 3: src = (r ^ a) < W ? base + (r ^ a) : -1; break;
      case 4: src = base + (r + a) % W; break;
      case 5: src = base + ((r - a) % W + W) % W; break;
      case 6: src = first; break;
    }
    if (keep_own) mlxc_set(L[i], MLXC_SHUFFLE_EDGE_POISON ? mlxc_poison<T>(poison) : mlxc_in<T>(L[i]));
    else if (src >= 0 && act[src]) mlxc_set(L[i], mlxc_in<T>(L[src]));
    else mlxc_set(L[i], mlxc_poison<T>(poison));
  }
}
// shuffle_and_fill: down takes `in` of lane+delta, or the filling (in2) of lane+delta-W past the end; up mirrors it.
template <class T, bool Down>
void mlxc_exec_fill(MlxcLane* L, const int* act, const void* poison) {
  for (int i = 0; i < 32; ++i) {
    if (!act[i]) continue;
    int a = static_cast<int>(L[i].arg), src = Down ? i + a : i - a;
    const void* from;
    if (src >= 0 && src < 32) from = act[src] ? L[src].in : nullptr;
    else {
      int f = Down ? src - 32 : src + 32;
      from = act[f] ? L[f].in2 : nullptr;
    }
    mlxc_set(L[i], from ? *static_cast<const T*>(from) : mlxc_poison<T>(poison));
  }
}
inline void mlxc_exec_vote(MlxcLane* L, const int* act, const void*) {
  uint64_t bits = 0, active = 0;
  int first = -1;
  for (int i = 0; i < 32; ++i)
    if (act[i]) {
      active |= uint64_t(1) << i;
      if (mlxc_in<bool>(L[i])) bits |= uint64_t(1) << i;
      if (first < 0) first = i;
    }
  for (int i = 0; i < 32; ++i) {
    if (!act[i]) continue;
    uint64_t v = bits;
    switch (L[i].arg) {
      case 1: v = bits == active; break;       // all
      case 2: v = bits != 0; break;            // any
      case 3: v = i == first; break;           // is_first
      case 4: v = active; break;               // active mask
      default: break;                          // ballot
    }
    mlxc_set(L[i], v);
  }
}
inline void mlxc_exec_none(MlxcLane*, const int*, const void*) {}

template <class T>
inline T mlxc_simd(MlxcSimdExec e, const T& x, uint32_t arg, unsigned line, unsigned col, int quad = 0) {
  T out;
  mlxc_rt_simd(e, quad, &x, nullptr, &out, arg, line, col);
  return out;
}

#define MLXC_SIMD_REDUCE(name, Op)                                                                             \
  template <class T>                                                                                           \
  inline T name(T x, MLXC_HERE) { return mlxc_simd(&mlxc_exec_reduce<T, Op, 32>, x, 0, MLXC_AT); }
MLXC_SIMD_REDUCE(simd_sum, mlxc_add)
MLXC_SIMD_REDUCE(simd_product, mlxc_mul)
MLXC_SIMD_REDUCE(simd_max, mlxc_max)
MLXC_SIMD_REDUCE(simd_min, mlxc_min)
MLXC_SIMD_REDUCE(simd_and, mlxc_and)
MLXC_SIMD_REDUCE(simd_or, mlxc_or)
MLXC_SIMD_REDUCE(simd_xor, mlxc_xor)
#undef MLXC_SIMD_REDUCE
#define MLXC_QUAD_REDUCE(name, Op)                                                                             \
  template <class T>                                                                                           \
  inline T name(T x, MLXC_HERE) { return mlxc_simd(&mlxc_exec_reduce<T, Op, 4>, x, 0, MLXC_AT, 1); }
MLXC_QUAD_REDUCE(quad_sum, mlxc_add)
MLXC_QUAD_REDUCE(quad_product, mlxc_mul)
MLXC_QUAD_REDUCE(quad_max, mlxc_max)
MLXC_QUAD_REDUCE(quad_min, mlxc_min)
#undef MLXC_QUAD_REDUCE
template <class T>
inline T simd_prefix_inclusive_sum(T x, MLXC_HERE) { return mlxc_simd(&mlxc_exec_prefix<T, mlxc_add, true>, x, 0, MLXC_AT); }
template <class T>
inline T simd_prefix_exclusive_sum(T x, MLXC_HERE) { return mlxc_simd(&mlxc_exec_prefix<T, mlxc_add, false>, x, 0, MLXC_AT); }
template <class T>
inline T simd_prefix_inclusive_product(T x, MLXC_HERE) { return mlxc_simd(&mlxc_exec_prefix<T, mlxc_mul, true>, x, 0, MLXC_AT); }
template <class T>
inline T simd_prefix_exclusive_product(T x, MLXC_HERE) { return mlxc_simd(&mlxc_exec_prefix<T, mlxc_mul, false>, x, 0, MLXC_AT); }

#define MLXC_SHUFFLE(name, MODE, W, Q)                                                                         \
  template <class T, class I>                                                                                  \
  inline T name(T x, I a, MLXC_HERE) { return mlxc_simd(&mlxc_exec_shuffle<T, MODE, W>, x, uint32_t(a), MLXC_AT, Q); }
MLXC_SHUFFLE(simd_shuffle, 0, 32, 0)
MLXC_SHUFFLE(simd_broadcast, 0, 32, 0)
MLXC_SHUFFLE(simd_shuffle_down, 1, 32, 0)
MLXC_SHUFFLE(simd_shuffle_up, 2, 32, 0)
MLXC_SHUFFLE(simd_shuffle_xor, 3, 32, 0)
MLXC_SHUFFLE(simd_shuffle_rotate_down, 4, 32, 0)
MLXC_SHUFFLE(simd_shuffle_rotate_up, 5, 32, 0)
MLXC_SHUFFLE(quad_shuffle, 0, 4, 1)
MLXC_SHUFFLE(quad_broadcast, 0, 4, 1)
MLXC_SHUFFLE(quad_shuffle_down, 1, 4, 1)
MLXC_SHUFFLE(quad_shuffle_up, 2, 4, 1)
MLXC_SHUFFLE(quad_shuffle_xor, 3, 4, 1)
#undef MLXC_SHUFFLE
template <class T>
inline T simd_broadcast_first(T x, MLXC_HERE) { return mlxc_simd(&mlxc_exec_shuffle<T, 6, 32>, x, 0, MLXC_AT); }
template <class T, class I>
inline T simd_shuffle_and_fill_down(T data, T filling, I delta, MLXC_HERE) {
  T out;
  mlxc_rt_simd(&mlxc_exec_fill<T, true>, 0, &data, &filling, &out, uint32_t(delta), MLXC_AT);
  return out;
}
template <class T, class I>
inline T simd_shuffle_and_fill_up(T data, T filling, I delta, MLXC_HERE) {
  T out;
  mlxc_rt_simd(&mlxc_exec_fill<T, false>, 0, &data, &filling, &out, uint32_t(delta), MLXC_AT);
  return out;
}

struct simd_vote {
  typedef uint64_t vote_t;
  vote_t v;
  explicit operator vote_t() const { return v; }
  bool all() const { return v == 0xFFFFFFFFull; }
  bool any() const { return v != 0; }
};
inline uint64_t mlxc_vote(bool b, uint32_t what, unsigned line, unsigned col) {
  uint64_t out;
  mlxc_rt_simd(&mlxc_exec_vote, 0, &b, nullptr, &out, what, line, col);
  return out;
}
inline simd_vote simd_ballot(bool b, MLXC_HERE) { return simd_vote{mlxc_vote(b, 0, MLXC_AT)}; }
inline bool simd_all(bool b, MLXC_HERE) { return mlxc_vote(b, 1, MLXC_AT) != 0; }
inline bool simd_any(bool b, MLXC_HERE) { return mlxc_vote(b, 2, MLXC_AT) != 0; }
inline bool simd_is_first(MLXC_HERE) { return mlxc_vote(true, 3, MLXC_AT) != 0; }
inline simd_vote simd_active_threads_mask(MLXC_HERE) { return simd_vote{mlxc_vote(true, 4, MLXC_AT)}; }
inline bool simd_is_helper_thread() { return false; }
inline void simdgroup_barrier(mem_flags, MLXC_HERE) {
  int x = 0, out;
  mlxc_rt_simd(&mlxc_exec_none, 0, &x, nullptr, &out, 0, MLXC_AT);
}

// -------- atomics: fibers of one OS thread never run at once, so plain read-modify-write is atomic here.
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
template <class T>
struct atomic { T v; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
template <class T>
inline T atomic_load_explicit(const atomic<T>* o, memory_order) { return o->v; }
template <class T, class U>
inline void atomic_store_explicit(atomic<T>* o, U v, memory_order) { o->v = static_cast<T>(v); }
template <class T, class U>
inline T atomic_exchange_explicit(atomic<T>* o, U v, memory_order) { T r = o->v; o->v = static_cast<T>(v); return r; }
#define MLXC_ATOMIC_RMW(name, expr)                                                                            \
  template <class T, class U>                                                                                  \
  inline T name(atomic<T>* o, U u, memory_order) {                                                             \
    T r = o->v, v = static_cast<T>(u);                                                                         \
    o->v = expr;                                                                                               \
    return r;                                                                                                  \
  }
MLXC_ATOMIC_RMW(atomic_fetch_add_explicit, r + v)
MLXC_ATOMIC_RMW(atomic_fetch_sub_explicit, r - v)
MLXC_ATOMIC_RMW(atomic_fetch_max_explicit, (r > v ? r : v))
MLXC_ATOMIC_RMW(atomic_fetch_min_explicit, (r < v ? r : v))
MLXC_ATOMIC_RMW(atomic_fetch_and_explicit, r & v)
MLXC_ATOMIC_RMW(atomic_fetch_or_explicit, r | v)
MLXC_ATOMIC_RMW(atomic_fetch_xor_explicit, r ^ v)
#undef MLXC_ATOMIC_RMW
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(atomic<T>* o, T* expected, U desired, memory_order, memory_order) {
  if (o->v == *expected) { o->v = static_cast<T>(desired); return true; }
  *expected = o->v;
  return false;
}

}  // namespace metal

using namespace metal;

// ------------------------------------------------------------------------------------------------ MLX utilities

typedef half float16_t;
typedef bfloat bfloat16_t;

template <typename U>
struct Limits {
  static constexpr U max = std::numeric_limits<U>::max();
  static constexpr U min = std::numeric_limits<U>::min();
  static constexpr U finite_max = std::numeric_limits<U>::max();
  static constexpr U finite_min = std::numeric_limits<U>::min();
};
#define MLXC_FLOAT_LIMIT(T)                                                                                    \
  template <>                                                                                                  \
  struct Limits<T> {                                                                                           \
    static constexpr T max = std::numeric_limits<T>::infinity();                                               \
    static constexpr T min = -std::numeric_limits<T>::infinity();                                              \
    static constexpr T finite_max = std::numeric_limits<T>::max();                                             \
    static constexpr T finite_min = std::numeric_limits<T>::lowest();                                          \
  };
MLXC_FLOAT_LIMIT(float)
MLXC_FLOAT_LIMIT(half)
#undef MLXC_FLOAT_LIMIT
template <>
struct Limits<bfloat> {
  static inline const bfloat max = std::numeric_limits<bfloat>::infinity();
  static inline const bfloat min = -std::numeric_limits<bfloat>::infinity();
  static inline const bfloat finite_max = std::numeric_limits<bfloat>::max();
  static inline const bfloat finite_min = std::numeric_limits<bfloat>::lowest();
};
template <>
struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(uint elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(int64_t elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename T, typename U>
inline T ceildiv(T n, U m) { return (n + m - 1) / m; }
inline float log1p(float x) { return __builtin_log1pf(x); }
inline half log1p(half x) { return static_cast<half>(__builtin_log1pf(static_cast<float>(x))); }
inline bfloat log1p(bfloat x) { return bfloat(__builtin_log1pf(static_cast<float>(x))); }

#define METAL_FUNC inline
#define MLX_MTL_PRAGMA_UNROLL

// threadgroup declarations are rewritten to this by emulator.py: one object per threadgroup, shared by its threads
template <class A>
inline A& mlxc_threadgroup(int id, unsigned line) {
  return *static_cast<A*>(mlxc_rt_threadgroup_alloc(id, sizeof(A), alignof(A), line));
}

// Metal's address spaces: nothing on a CPU (threadgroup storage is the rewrite above). Last, so no header sees them.
#define device
#define constant
#define thread
#define threadgroup
#define ray_data
#define object_data
