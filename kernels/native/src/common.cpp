// Portable pieces: float conversions, activation preparation, and the scalar kernels (the reference the SIMD kernels
// are tested against, and the path on CPUs without AVX2).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace mlxc_native {

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400u));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3FFu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void to_float(const void* src, FloatType t, int64_t n, float* dst) {
  if (t == FloatType::f32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (t == FloatType::f16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(h[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(h[i]);
  }
}

void prepare_acts(const float* x, int64_t M, int K, int bits, int group_size, bool int8, bool float_,
                  int8_t* q, float* d, float* xf, float* gsum, bool natural_order) {
  const int nb = K / 32, G = K / group_size;
  float blk[32];
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* gs = gsum + m * G;
    if (!int8) {
      for (int g = 0; g < G; ++g) {
        float s = 0.f;
        for (int k = 0; k < group_size; ++k) s += xr[g * group_size + k];
        gs[g] = s;
      }
    } else {
      for (int g = 0; g < G; ++g) gs[g] = 0.f;
    }
    for (int b = 0; b < nb; ++b) {
      const float* xb = xr + b * 32;
      if (bits == 4 && !natural_order) {  // the block's even elements, then its odd ones
        for (int j = 0; j < 16; ++j) {
          blk[j] = xb[2 * j];
          blk[16 + j] = xb[2 * j + 1];
        }
      } else {
        std::memcpy(blk, xb, sizeof blk);
      }
      if (float_) std::memcpy(xf + m * K + b * 32, blk, sizeof blk);
      if (int8) {
        float amax = 0.f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(blk[j]));
        const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        d[m * nb + b] = dd;
        int8_t* qb = q + m * K + b * 32;
        int32_t qsum[2] = {0, 0};  // per half block: group 16 (GGUF Q6_K) splits a block in two
        for (int j = 0; j < 32; ++j) {
          qb[j] = static_cast<int8_t>(round_even(blk[j] * id));
          qsum[j / 16] += qb[j];
        }
        if (group_size == 16) {  // natural order only (the packed kernels'), so halves are groups
          gs[2 * b] += dd * static_cast<float>(qsum[0]);
          gs[2 * b + 1] += dd * static_cast<float>(qsum[1]);
        } else {
          gs[b * 32 / group_size] += dd * static_cast<float>(qsum[0] + qsum[1]);
        }
      }
    }
  }
}

Tuning& tuning() {
  static Tuning t = [] {
    Tuning u;
    if (const char* v = std::getenv("MLXC_NATIVE_PAR_MIN")) u.parallel_min_work = std::atoi(v);
    return u;
  }();
  return t;
}

void row_scales(const QWeight& w, int64_t n, float* sbuf, float* bbuf, const float** s, const float** b) {
  const int G = w.K / w.group_size, per = w.group_size / 32, nb = w.K / 32;
  if (w.scale_type == FloatType::f32) {
    const float* sg = static_cast<const float*>(w.scales) + n * G;
    *b = static_cast<const float*>(w.biases) + n * G;
    if (per == 1) {
      *s = sg;
      return;
    }
    for (int i = 0; i < nb; ++i) sbuf[i] = sg[i / per];
    *s = sbuf;
    return;
  }
  const size_t off = static_cast<size_t>(n) * G * 2;
  to_float(static_cast<const char*>(w.biases) + off, w.scale_type, G, bbuf);
  to_float(static_cast<const char*>(w.scales) + off, w.scale_type, G, sbuf);
  for (int i = nb - 1; i > 0 && per > 1; --i) sbuf[i] = sbuf[i / per];  // from the back: i / per < i
  *s = sbuf;
  *b = bbuf;
}

namespace {

// 32 codes of block b of a row, in activation order (4-bit: even elements, then odd).
template <int BITS>
inline void block_codes(const uint8_t* row, int b, uint8_t out[32]) {
  if constexpr (BITS == 8) {
    std::memcpy(out, row + b * 32, 32);
  } else {
    const uint8_t* c = row + b * 16;
    for (int j = 0; j < 16; ++j) {
      out[j] = c[j] & 0x0F;
      out[16 + j] = c[j] >> 4;
    }
  }
}

template <int BITS, bool INT8>
void qmm_scalar(const QWeight& w, const QActs& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int K = w.K, nb = K / 32, G = K / w.group_size;
  const size_t row_bytes = static_cast<size_t>(K) * BITS / 8;
  std::vector<float> sbuf(nb), bbuf(G);
  const float *sw, *bw;
  uint8_t c[32];
  for (int64_t n = n0; n < n1; ++n) {
    row_scales(w, n, sbuf.data(), bbuf.data(), &sw, &bw);
    const uint8_t* row = w.codes + n * row_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int b = 0; b < nb; ++b) {
        block_codes<BITS>(row, b, c);
        if constexpr (INT8) {
          const int8_t* xq = a.q + m * K + b * 32;
          int32_t s = 0;
          for (int j = 0; j < 32; ++j) s += static_cast<int32_t>(c[j]) * xq[j];
          acc += sw[b] * a.d[m * nb + b] * static_cast<float>(s);
        } else {
          const float* xb = a.xf + m * K + b * 32;
          float s = 0.f;
          for (int j = 0; j < 32; ++j) s += static_cast<float>(c[j]) * xb[j];
          acc += sw[b] * s;
        }
      }
      const float* gs = a.gsum + m * G;
      for (int g = 0; g < G; ++g) acc += bw[g] * gs[g];
      y[m * ldy + n] = acc;
    }
  }
}

// Packed weights (see kernels_x86.inc): row n is lane n % 16 of tile n / 16.
void scalar_int8_packed(const QWeight& w, const QActs& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int K = w.K, nb = K / 32, G = K / w.group_size;
  PackedRowReader row(w);
  for (int64_t n = n0; n < n1; ++n) {
    row.load(n);
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* xq = a.q + m * K;  // natural order
      float acc = 0.f;
      for (int blk = 0; blk < nb; ++blk) {
        if (w.group_size == 16) {  // two groups per block
          int32_t isum[2] = {0, 0};
          for (int k = 0; k < 32; ++k) isum[k / 16] += row.code(blk * 32 + k) * xq[blk * 32 + k];
          acc += (row.scale[2 * blk] * static_cast<float>(isum[0]) + row.scale[2 * blk + 1] * static_cast<float>(isum[1])) *
                 a.d[m * nb + blk];
          continue;
        }
        int32_t isum = 0;
        for (int k = 0; k < 32; ++k) isum += row.code(blk * 32 + k) * xq[blk * 32 + k];
        acc += row.scale[blk * 32 / w.group_size] * a.d[m * nb + blk] * static_cast<float>(isum);
      }
      for (int g = 0; g < G; ++g) acc += row.bias[g] * a.gsum[m * G + g];
      y[m * ldy + n] = acc;
    }
  }
}

void scalar_int8(const QWeight& w, const QActs& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  (w.bits == 4 ? qmm_scalar<4, true> : qmm_scalar<8, true>)(w, a, y, ldy, n0, n1);
}

void scalar_float(const QWeight& w, const QActs& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  (w.bits == 4 ? qmm_scalar<4, false> : qmm_scalar<8, false>)(w, a, y, ldy, n0, n1);
}

}  // namespace

const KernelSet* kernels_scalar() {
  static const KernelSet k{"scalar", scalar_int8, scalar_float, nullptr, scalar_int8_packed};
  return &k;
}

PackedRowReader::PackedRowReader(const QWeight& w)
    : scale(w.K / w.group_size),
      bias(w.K / w.group_size),
      w_(w),
      block_bytes_(w.bits == 4 ? 256 : 512),
      tile_bytes_(static_cast<size_t>(w.K / 32) * block_bytes_),
      item_(w.scale_type == FloatType::f32 ? 4 : 2) {}

void PackedRowReader::load(int64_t n) {
  const int64_t t = n / 16, r = n % 16;
  const int G = static_cast<int>(scale.size());
  for (int g = 0; g < G; ++g) {  // group g's scale and bias sit at [t, g * 16 + r]
    const size_t off = (static_cast<size_t>(t) * G * 16 + g * 16 + r) * item_;
    to_float(static_cast<const char*>(w_.scales) + off, w_.scale_type, 1, &scale[g]);
    to_float(static_cast<const char*>(w_.biases) + off, w_.scale_type, 1, &bias[g]);
  }
  row_ = w_.codes + t * tile_bytes_ + 4 * r;
}

}  // namespace mlxc_native
