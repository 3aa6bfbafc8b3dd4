// Compiled with this instruction set's flags only (see CMakeLists.txt); chosen at run time by dispatch.cpp.
#define MLXC_ISA_NS avx2
#include "kernels_x86.inc"

namespace mlxc_native {
const KernelSet* kernels_avx2() {
  static const KernelSet k{"avx2", avx2::qmm_int8, avx2::qmm_float, nullptr, avx2::qmm_int8_packed};
  return &k;
}
}  // namespace mlxc_native
