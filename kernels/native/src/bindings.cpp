// Python bindings: the module mlxc.kernels.native._mlxc_native (wrapped by kernels/native/__init__.py).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "dispatch.h"
#include "gemv.h"
#include "kernels.h"
#include "layers.h"
#include "mlx/version.h"
#include "ops.h"
#include "parallel.h"
#include "scan.h"

namespace nb = nanobind;
using namespace nb::literals;

#define MLXC_STR2(x) #x
#define MLXC_STR(x) MLXC_STR2(x)

NB_MODULE(_mlxc_native, m) {
  m.doc() = "mlxc native CPU kernels on MLX's affine quantized layout (see mlxc.kernels.native)";
  m.attr("built_with_mlx") =
      MLXC_STR(MLX_VERSION_MAJOR) "." MLXC_STR(MLX_VERSION_MINOR) "." MLXC_STR(MLX_VERSION_PATCH);

  m.def("qmatmul", &mlxc_native::qmatmul, "x"_a, "codes"_a, "scales"_a, "biases"_a, nb::kw_only(), "bits"_a,
        "group_size"_a, "int8_activations"_a = true, "act_terms"_a = 1, "stream"_a = nb::none(),
        "y = x @ W.T for W in MLX's affine layout (codes, scales, biases); y has x's dtype.");
  m.def("qmatmul_packed", &mlxc_native::qmatmul_packed, "x"_a, "pcodes"_a, "pscales"_a, "pbiases"_a, nb::kw_only(),
        "bits"_a, "group_size"_a, "n"_a, "act_terms"_a = 1, "stream"_a = nb::none(),
        "y = x @ W.T for W packed by mlxc.kernels.native.pack (int8 activations).");
  m.def("qembed", &mlxc_native::qembed, "ids"_a, "codes"_a, "scales"_a, "biases"_a, nb::kw_only(), "bits"_a,
        "group_size"_a, "dtype"_a = nb::none(), "stream"_a = nb::none(),
        "Rows ids of W, dequantized: shape ids.shape + (K,).");

  m.def("qembed_packed", &mlxc_native::qembed_packed, "ids"_a, "pcodes"_a, "pscales"_a, "pbiases"_a, nb::kw_only(),
        "bits"_a, "group_size"_a, "n"_a, "dtype"_a = nb::none(), "stream"_a = nb::none(),
        "Rows ids of a packed W, dequantized.");
  m.def("linear", &mlxc_native::linear, "x"_a, "w"_a, "bias"_a = nb::none(), nb::kw_only(), "stream"_a = nb::none(),
        "x @ w.T (+ bias) for float w [N, K], streaming each weight row once (few rows of x: a decode step).");
  m.def("rms_norm", &mlxc_native::rms_norm, "x"_a, "w"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x * rsqrt(mean(x^2) + eps) * w over the last axis, in float32 (mx.fast.rms_norm).");
  m.def(
      "rope",
      [](const mlx::core::array& x, int dims, bool traditional, const mlx::core::array& freqs,
         const std::variant<int, mlx::core::array>& offset, mlx::core::StreamOrDevice s) {
        if (std::holds_alternative<int>(offset))
          return mlxc_native::rope(x, dims, traditional, freqs, std::get<int>(offset), s);
        return mlxc_native::rope(x, dims, traditional, freqs, std::get<mlx::core::array>(offset), s);
      },
      "x"_a, "dims"_a, nb::kw_only(), "traditional"_a, "freqs"_a, "offset"_a, "stream"_a = nb::none(),
      "Rotary embedding of x [B, H, T, D] at positions offset + t (mx.fast.rope with freqs, scale 1).");
  m.def("attention_decode", &mlxc_native::attention_decode, "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a,
        "window"_a = 0, "stream"_a = nb::none(),
        "softmax(scale * q @ k.T) @ v for one query per head over (the last `window` of) S keys; GQA by index.");
  m.def("attention", &mlxc_native::attention, "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a, "window"_a = 0,
        "stream"_a = nb::none(),
        "Causal softmax(scale * q @ k.T) @ v for T queries at the last T of S key positions; GQA by index.");
  m.def("attention_qkv_decode", &mlxc_native::attention_qkv_decode, "qkv"_a, "k_cache"_a, "v_cache"_a, "freqs"_a,
        nb::kw_only(), "offset"_a, "q_heads"_a, "kv_heads"_a, "head_dim"_a, "rope_dims"_a, "traditional"_a, "scale"_a,
        "window"_a = 0, "stream"_a = nb::none(),
        "One decode step from a fused QKV row: rope q and k, write k and v into the caches at offset, attend; "
        "returns (out, k_cache, v_cache).");
  m.def("glu", &mlxc_native::glu, "x"_a, nb::kw_only(), "activation"_a, "stream"_a = nb::none(),
        "act(x[..., :n]) * x[..., n:] in float32 for activation 'silu' or 'gelu_tanh'; result in x's dtype.");
  m.def("selective_scan", &mlxc_native::selective_scan, "u"_a, "delta"_a, "A"_a, "B"_a, "C"_a, "D"_a, "dt_bias"_a,
        "z"_a = nb::none(), "h0"_a = nb::none(), nb::kw_only(), "stream"_a = nb::none(),
        "Mamba's selective scan in float32: (y [B, T, Dm], final state [B, Dm, N]).");
  m.def("isa", [] { return std::string(mlxc_native::active_kernels().name); },
        "The instruction set whose kernels run.");
  m.def("supported_isas", &mlxc_native::supported_isas, "Instruction sets this CPU can run, best first.");
  m.def("set_isa", &mlxc_native::set_isa, "name"_a, "Choose kernels by name ('auto': the best); False if unsupported.");
  m.def("threads", &mlxc_native::get_threads);
  m.def("set_threads", &mlxc_native::set_threads, "n"_a, "Threads per call, the stream thread included; 0: default.");
  m.def("default_threads", &mlxc_native::default_threads);
  m.def(
      "set_tuning",
      [](const std::string& name, int value) {
        auto& t = mlxc_native::tuning();
        if (name == "parallel_min_work") t.parallel_min_work = value;
        else if (name == "chunks_per_thread") t.chunks_per_thread = value;
        else if (name == "tiles_min_m") t.tiles_min_m = value;
        else throw std::invalid_argument("unknown tuning knob " + name);
      },
      "name"_a, "value"_a, "For experiments: parallel_min_work, chunks_per_thread, tiles_min_m.");
  m.def("spin_us", &mlxc_native::get_spin_us);
  m.def("set_spin_us", &mlxc_native::set_spin_us, "us"_a, "How long idle helper threads spin before sleeping.");
}
