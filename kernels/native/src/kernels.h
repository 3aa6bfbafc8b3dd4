// Quantized matmul kernels on MLX's affine layout, free of MLX headers so that each instruction set's translation
// unit can be compiled with its own flags (kernels_avx2.cpp, kernels_avx512.cpp, kernels_avx512vnni.cpp on x86-64,
// kernels_neon.cpp and kernels_neon_dotprod.cpp on arm64) while the code that touches MLX (ops.cpp) is compiled for
// the baseline.
//
// Layout (MLX affine, bits in {4, 8}, group_size in {32, 64, 128}): W is N x K; row n is K*bits/8 bytes of codes,
// element k in byte k*bits/8, 4-bit codes low nibble first; w[n, k] = scales[n, g] * code + biases[n, g] with
// g = k / group_size. GGUF Q4_0 / Q4_1 / Q8_0 load into exactly this form with group_size 32, Q4_K with group_size 32
// and float32 scales (d * sc, -dmin * m: exact). Group size 16 with 8-bit codes is GGUF Q6_K's layout (codes 0..63,
// scale d * sc, bias -32 * scale): only the packed kernels (qmm_int8_packed, two groups per 32-block) and the lookups
// take it; the unpacked matmul kernels assume one scale per 32-block.
//
// Activations are prepared once per call (prepare_acts): per 32-element block an int8 code q and a scale d with
// x ~= d * q (|q| <= 127, d = max|x| / 127, round to nearest), or x in float for the float path, and the sum of x
// over each weight group for the bias term sum_g b_g * sum_{k in g} x_k. On the int8 path that sum is of the
// quantized values (d * sum q, llama.cpp's Q8_1 convention), so the result is exactly W @ x_quantized and the error
// is sum_k w_k (x_k - d q_k); the exact sum would weight the error by w_k - b_g instead, and affine biases are
// large (about the group's minimum), which measured 3x worse. For 4-bit weights a block's activations are stored as its 16 even elements followed by
// its 16 odd ones, the order in which low and high nibbles come out of 16 code bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace mlxc_native {

enum class FloatType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct QWeight {
  const uint8_t* codes;  // N rows of K * bits / 8 bytes
  const void* scales;    // N x K / group_size, of scale_type
  const void* biases;    // N x K / group_size, of scale_type
  FloatType scale_type;
  int64_t N;
  int K;
  int bits;
  int group_size;
};

struct QActs {
  int64_t M;
  int K;
  const int8_t* q;     // M x K int8 codes (int8 path), block order as above
  const float* d;      // M x K/32 block scales (int8 path)
  const float* xf;     // M x K floats in the same order (float path)
  const float* gsum;   // M x K/group_size: sum of x (int8 path: of d * q) over each weight group
};

// Rows [n0, n1) of y = x @ W.T for all M activation rows; y[m * ldy + n], float.
using QmmFn = void (*)(const QWeight&, const QActs&, float* y, int64_t ldy, int64_t n0, int64_t n1);

struct KernelSet {
  const char* name;
  QmmFn qmm_int8;   // activations quantized to int8 per 32-block, integer dot products
  QmmFn qmm_float;  // activations in float, weights dequantized in registers
  // Optional, for many activation rows: int8 path on tiles of 16 weight rows repacked on the fly; takes activations
  // in natural order (prepare_acts with natural_order). Rows [n0, n1) with n0 a multiple of 16.
  QmmFn qmm_int8_tiles = nullptr;
  // int8 path on weights packed ahead of time (QWeight then holds the packed arrays, f32 or f16 scales; see
  // kernels_x86.inc); natural-order activations; n0 a multiple of 16.
  QmmFn qmm_int8_packed = nullptr;
};

const KernelSet* kernels_scalar();
// nullptr where not compiled in (x86 kernels on arm64 builds and the other way round); the caller checks the CPU
// before using one.
const KernelSet* kernels_avx2();
const KernelSet* kernels_avx512();
const KernelSet* kernels_avx512vnni();
const KernelSet* kernels_neon();          // kernels_arm.inc, ARMv8.0 Advanced SIMD
const KernelSet* kernels_neon_dotprod();  // the same with ARMv8.2's sdot

// Shared helpers (common.cpp, baseline flags).
// One row at a time of a packed weight (kernels_x86.inc's layout: row n is lane n % 16 of tile n / 16), for the
// scalar paths that need a row's values (the SIMD kernels read whole tiles): `load(n)` reads row n's scales and
// biases as float, `code(k)` its code k. The buffers are reused from row to row.
class PackedRowReader {
 public:
  explicit PackedRowReader(const QWeight& w);
  void load(int64_t n);
  int code(int k) const {
    const int blk = k / 32, j = (k % 32) / 4, byte = k % 4;
    if (w_.bits == 4) {
      const uint8_t v = row_[blk * block_bytes_ + (j % 4) * 64 + byte];
      return j < 4 ? v & 0x0F : v >> 4;
    }
    return row_[blk * block_bytes_ + j * 64 + byte];
  }
  std::vector<float> scale, bias;  // row n's, per group

 private:
  const QWeight& w_;
  size_t block_bytes_, tile_bytes_, item_;
  const uint8_t* row_ = nullptr;
};

float f16_to_float(uint16_t h);
float bf16_to_float(uint16_t h);
void to_float(const void* src, FloatType t, int64_t n, float* dst);
// x: M x K floats, row-major. int8 != 0 fills q and d, float_ != 0 fills xf; gsum always.
// natural_order: keep each block's elements in order even for 4-bit weights (for qmm_int8_tiles).
void prepare_acts(const float* x, int64_t M, int K, int bits, int group_size, bool int8, bool float_,
                  int8_t* q, float* d, float* xf, float* gsum, bool natural_order = false);

// Row n's scales as floats, one per 32-block (repeated for group sizes above 32), and its biases, one per group.
// *s and *b point into the weight arrays when they are already f32 (group size 32 for *s), else into sbuf (K/32
// floats) and bbuf (K/group_size floats). Defined out of line, in the baseline translation unit: the SIMD units use
// nothing inline from a header but intrinsics, so the linker cannot pick an AVX-512 copy of shared code.
void row_scales(const QWeight& w, int64_t n, float* sbuf, float* bbuf, const float** s, const float** b);

// Round to nearest, ties to even (std::nearbyint in the default rounding mode) for |v| < 2^22, as two float adds: on
// the baseline ISA nearbyint is a libm call per element, this vectorizes. Internal linkage: each unit its own copy.
static inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

// Tuning knobs, read at each call (set from Python for experiments: _mlxc_native.set_tuning).
struct Tuning {
  int parallel_min_work = 1 << 20;  // multiply-adds below which a call stays on one thread (MLXC_NATIVE_PAR_MIN)
  int chunks_per_thread = 8;
  int tiles_min_m = 3;  // activation rows from which qmm_int8_tiles runs (where the ISA has it)
};
Tuning& tuning();

// Largest K the kernels take (their per-row buffers live on the stack).
constexpr int kMaxK = 65536;

// What every instruction set's packed kernel (qmm_int8_packed) shares: the walk over a packed weight's tiles and the
// choice of instantiation by layout. In an unnamed namespace, like round_even: each unit compiles its own copy with
// its own flags, so the linker cannot hand one unit another's instructions.
namespace {

constexpr int kPackedTileRows = 16;  // the packed layout: 16 weight rows side by side (kernels_x86.inc)

// One tile of a packed weight: its codes and its scales and biases (per group, the tile's rows side by side), and
// how many of its rows the call computes (the last tile of [n0, n1) may be partial).
struct PackedTile {
  const uint8_t* codes;
  const void* scales;
  const void* biases;
  int rows;
};

// visit(tile, n) for the tiles of rows [n0, n1), n0 a multiple of kPackedTileRows; SF: scales stored as float32 (0)
// or float16 (1).
template <int BITS, int SF, class Visit>
inline void for_each_packed_tile(const QWeight& w, int64_t n0, int64_t n1, Visit&& visit) {
  const size_t tile_bytes = static_cast<size_t>(w.K / 32) * (BITS == 4 ? 256 : 512);
  const size_t tile_scales = static_cast<size_t>(w.K / w.group_size) * kPackedTileRows * (SF == 0 ? 4 : 2);
  for (int64_t n = n0; n < n1; n += kPackedTileRows) {
    const int64_t t = n / kPackedTileRows;
    visit(PackedTile{w.codes + t * tile_bytes, static_cast<const char*>(w.scales) + t * tile_scales,
                     static_cast<const char*>(w.biases) + t * tile_scales,
                     static_cast<int>(n1 - n < kPackedTileRows ? n1 - n : kPackedTileRows)},
          n);
  }
}

// 32-blocks per scale group as a shift (block index >> shift = group index), for group sizes 32, 64 and 128.
inline int packed_group_shift(const QWeight& w) { return w.group_size <= 32 ? 0 : w.group_size == 64 ? 1 : 2; }

// run(bits, sf, g16) with the packed weight's layout as compile-time constants (std::integral_constant): 4- or 8-bit
// codes, float32 or float16 scales, and group 16 (GGUF Q6_K: 8-bit codes, two scale groups per 32-block).
template <class Run>
inline void with_packed_layout(const QWeight& w, Run&& run) {
  using Four = std::integral_constant<int, 4>;
  using Eight = std::integral_constant<int, 8>;
  using F32 = std::integral_constant<int, 0>;
  using F16 = std::integral_constant<int, 1>;
  using G16 = std::true_type;
  using G32Up = std::false_type;  // groups of 32, 64 or 128
  const bool f16 = w.scale_type == FloatType::f16;
  if (w.group_size == 16)
    f16 ? run(Eight{}, F16{}, G16{}) : run(Eight{}, F32{}, G16{});
  else if (w.bits == 4)
    f16 ? run(Four{}, F16{}, G32Up{}) : run(Four{}, F32{}, G32Up{});
  else
    f16 ? run(Eight{}, F16{}, G32Up{}) : run(Eight{}, F32{}, G32Up{});
}

}  // namespace

}  // namespace mlxc_native
