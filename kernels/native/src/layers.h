// Native versions of the non-matmul ops a decode step runs, which MLX's CPU backend composes from several ops
// (measured on SmolLM2-135M shapes: rms_norm ~26 us, rope ~67 us, decode attention ~123 us per call): each one
// primitive, computing in float32, with MLX's own op (mx.fast.*) as its reference and as its gradient.
#pragma once

#include <optional>
#include <string>
#include <tuple>

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

// Causal softmax(scale * q @ k.T) @ v for T >= 1 queries per head (a prompt, or a decode step): q [B, Hq, T, D], k and
// v [B, Hkv, S, D] with S >= T (any strides: a KV cache's views), the queries at positions S - T .. S - 1; query t
// sees keys j <= S - T + t, and only those with S - T + t - j < window when window > 0. Grouped-query heads by index.
// T == 1 runs attention_decode's kernel. Its gradient is that of mx.fast.scaled_dot_product_attention's with the
// same mask.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, int window = 0,
                    mx::StreamOrDevice s = {});

// One decode step of attention from a fused QKV projection's output, in one primitive (it replaces the split,
// reshapes, transposes, two ropes, two cache writes and the attention of the composed path): qkv [B, 1, (Hq + 2 Hkv)
// D] holds the new token's query, key and value heads in that order; k_cache and v_cache [B, Hkv, C, D] hold
// positions 0 .. offset - 1. Rotates q and k at position `offset` (as `rope` above, on the first rope_dims
// features), writes k and v into the caches at `offset` and attends over positions start .. offset, start =
// max(0, offset + 1 - window) when window > 0, else 0 (grouped-query heads by index). Returns (out [B, 1, Hq D],
// k_cache', v_cache'); the caches are updated in place when MLX may donate their buffers, else copied first.
// Decode only: no gradient.
std::tuple<mx::array, mx::array, mx::array> attention_qkv_decode(
    const mx::array& qkv, const mx::array& k_cache, const mx::array& v_cache, const mx::array& freqs, int offset,
    int q_heads, int kv_heads, int head_dim, int rope_dims, bool traditional, float scale, int window = 0,
    mx::StreamOrDevice s = {});

// act(x[..., :n]) * x[..., n:] for x [..., 2n], in float32 with the result in x's dtype; activation "silu"
// (nn.silu) or "gelu_tanh" (nn.gelu_approx). Its gradient is that of MLX's composition.
mx::array glu(const mx::array& x, const std::string& activation, mx::StreamOrDevice s = {});

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

class AttentionPrim : public mx::UnaryPrimitive {
 public:
  AttentionPrim(mx::Stream stream, float scale, int window)
      : mx::UnaryPrimitive(stream), scale_(scale), window_(window) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  int window_;
};

class AttentionQkvDecodePrim : public mx::Primitive {
 public:
  AttentionQkvDecodePrim(mx::Stream stream, int offset, int q_heads, int kv_heads, int head_dim, int rope_dims,
                         bool traditional, float scale, int window)
      : mx::Primitive(stream), offset_(offset), q_heads_(q_heads), kv_heads_(kv_heads), head_dim_(head_dim),
        rope_dims_(rope_dims), traditional_(traditional), scale_(scale), window_(window) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcAttentionQkvDecode"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int offset_, q_heads_, kv_heads_, head_dim_, rope_dims_;
  bool traditional_;
  float scale_;
  int window_;
};

class GluPrim : public mx::UnaryPrimitive {
 public:
  enum Activation { kSilu = 0, kGeluTanh = 1 };
  GluPrim(mx::Stream stream, Activation act) : mx::UnaryPrimitive(stream), act_(act) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "MlxcGlu"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  Activation act_;
};

}  // namespace mlxc_native
