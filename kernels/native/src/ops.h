// The MLX side: primitives that put the kernels into MLX's lazy graph (so they run under mx.compile like built-ins).
#pragma once

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlxc_native {

namespace mx = mlx::core;

// y = x @ W.T with W in MLX's affine layout (codes uint32 [N, K*bits/32], scales and biases [N, K/group_size] in
// float32, float16 or bfloat16). x: [..., K] in float32, float16 or bfloat16; y: [..., N] in x's dtype.
// int8_activations: quantize x to int8 per 32-block for integer dot products (else float). act_terms 2: quantize
// twice, the second pass the first's residual (x ~= d1 q1 + d2 q2: about 1/100 of one pass's error, twice the
// integer work), computed as two activation rows per row of x.
mx::array qmatmul(const mx::array& x, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                  int bits, int group_size, bool int8_activations, int act_terms = 1, mx::StreamOrDevice s = {});

// The same product on weights packed ahead of time by mlxc.kernels.native.pack (16 rows side by side; int8
// activations; every ISA, fastest with AVX-512 VNNI): pcodes uint8 [ceil(n/16), K/32 * 256 (4-bit) or 512 (8-bit)], pscales and
// pbiases [ceil(n/16), K/group_size * 16] in float32 or float16; n is W's row count.
mx::array qmatmul_packed(const mx::array& x, const mx::array& pcodes, const mx::array& pscales,
                         const mx::array& pbiases, int bits, int group_size, int n, int act_terms = 1,
                         mx::StreamOrDevice s = {});

// Rows of a quantized matrix, dequantized: ids [...] (integer) -> [..., K] in `dtype` (default: the scales' dtype).
mx::array qembed(const mx::array& ids, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                 int bits, int group_size, std::optional<mx::Dtype> dtype, mx::StreamOrDevice s = {});

// qembed on a table packed by mlxc.kernels.native.pack (so a tied embedding and LM head share one packed copy).
mx::array qembed_packed(const mx::array& ids, const mx::array& pcodes, const mx::array& pscales,
                        const mx::array& pbiases, int bits, int group_size, int n, std::optional<mx::Dtype> dtype,
                        mx::StreamOrDevice s = {});

class QMatmul : public mx::UnaryPrimitive {
 public:
  QMatmul(mx::Stream stream, int bits, int group_size, bool int8_activations, int packed_rows = 0, int act_terms = 1)
      : mx::UnaryPrimitive(stream),
        bits_(bits),
        group_size_(group_size),
        int8_(int8_activations),
        packed_rows_(packed_rows),
        terms_(act_terms) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcQMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int bits_, group_size_;
  bool int8_;
  int packed_rows_;  // > 0: the weight is packed (inputs are pcodes, pscales, pbiases) and has this many rows
  int terms_;        // int8 activation passes: 1, or 2 (the residual quantized again)
};

class QEmbed : public mx::UnaryPrimitive {
 public:
  QEmbed(mx::Stream stream, int bits, int group_size, int k, int packed_rows = 0)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size), k_(k), packed_rows_(packed_rows) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcQEmbed"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int bits_, group_size_, k_;
  int packed_rows_;  // > 0: the table is packed (pcodes, pscales, pbiases) and has this many rows
};

}  // namespace mlxc_native
