// What every MLX primitive of the extension shares (baseline translation units only: it includes MLX's headers):
// argument errors, the CPU stream, output allocation and gradients taken from MLX's own ops.
#pragma once

#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"
#include "mlx/utils.h"

namespace mlxc_native {

namespace mx = mlx::core;

// An argument error, "[mlxc.op] what": Python sees a ValueError naming the op.
[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("[") + op + "] " + what);
}

inline bool is_float(mx::Dtype t) { return t == mx::float32 || t == mx::float16 || t == mx::bfloat16; }

inline FloatType float_type(mx::Dtype t) {
  return t == mx::float32 ? FloatType::f32 : t == mx::float16 ? FloatType::f16 : FloatType::bf16;
}

// A shape as Python prints a tuple: (3,) or (2, 4).
inline std::string shape_str(const mx::Shape& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline mx::Stream cpu_stream(mx::StreamOrDevice s) {
  mx::Stream st = mx::to_stream(s, mx::Device::cpu);
  if (st.device != mx::Device::cpu) throw std::invalid_argument("mlxc native kernels run on the CPU only");
  return st;
}

// The output's buffer, and the inputs and output registered with the stream's encoder (before `dispatch`).
inline void prepare_output(mx::array& out, const std::vector<mx::array>& inputs, mx::Stream stream) {
  auto& enc = mx::cpu::get_command_encoder(stream);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
}

// A primitive's gradient: MLX's own ops on the same inputs (the reference), differentiated by MLX.
inline std::vector<mx::array> reference_vjp(
    const std::function<std::vector<mx::array>(const std::vector<mx::array>&)>& f,
    const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents, const std::vector<int>& argnums) {
  auto [_, grads] = mx::vjp(f, primals, cotangents);
  std::vector<mx::array> out;
  for (int a : argnums) out.push_back(grads[a]);
  return out;
}

}  // namespace mlxc_native
