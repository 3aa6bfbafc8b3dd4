// Compiled with this instruction set's flags only (see CMakeLists.txt); chosen at run time by dispatch.cpp.
#define MLXC_ISA_NS avx512
#include "kernels_x86.inc"

namespace mlxc_native {
const KernelSet* kernels_avx512() {
  static const KernelSet k{"avx512", avx512::qmm_int8, avx512::qmm_float, nullptr, avx512::qmm_int8_packed};
  return &k;
}
}  // namespace mlxc_native
