// Native versions of the non-matmul ops a decode step runs, which MLX's CPU backend composes from several ops
// (measured on SmolLM2-135M shapes: rms_norm ~26 us, rope ~67 us, decode attention ~123 us per call): each one
// primitive, computing in float32, with MLX's own op (mx.fast.*) as its reference and as its gradient.
#pragma once

#include <optional>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlxc_native {

namespace mx = mlx::core;

// x * rsqrt(mean(x^2) + eps) * w over the last axis (mx.fast.rms_norm): x [..., D], w [D]; result in x's dtype.
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s = {});

// Rotary embedding of x [B, H, T, D] (any strides) at positions offset + t, on the first `dims` features, with
// inverse frequencies 1 / freqs [dims / 2] (mx.fast.rope with base=None, scale=1); offset an int or an int array
// holding one value.
mx::array rope(const mx::array& x, int dims, bool traditional, const mx::array& freqs, int offset,
               mx::StreamOrDevice s = {});
mx::array rope(const mx::array& x, int dims, bool traditional, const mx::array& freqs, const mx::array& offset,
               mx::StreamOrDevice s = {});

// softmax(scale * q @ k.T) @ v for one query per head: q [B, Hq, 1, D], k and v [B, Hkv, S, D] (any strides: a KV
// cache's views), Hq a multiple of Hkv (grouped-query heads by index); only the last `window` keys when window > 0.
mx::array attention_decode(const mx::array& q, const mx::array& k, const mx::array& v, float scale, int window,
                           mx::StreamOrDevice s = {});

class RMSNormPrim : public mx::UnaryPrimitive {
 public:
  RMSNormPrim(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
  const char* name() const override { return "MlxcRMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float eps_;
};

class RopePrim : public mx::UnaryPrimitive {
 public:
  // inputs: x, freqs[, offset array]; offset_ is used when there is no offset input
  RopePrim(mx::Stream stream, int dims, bool traditional, int offset)
      : mx::UnaryPrimitive(stream), dims_(dims), traditional_(traditional), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
  const char* name() const override { return "MlxcRope"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int dims_;
  bool traditional_;
  int offset_;
};

class AttentionDecodePrim : public mx::UnaryPrimitive {
 public:
  AttentionDecodePrim(mx::Stream stream, float scale, int window)
      : mx::UnaryPrimitive(stream), scale_(scale), window_(window) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcAttentionDecode"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  int window_;
};

}  // namespace mlxc_native
