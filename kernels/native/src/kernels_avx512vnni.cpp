// Compiled with this instruction set's flags only (see CMakeLists.txt); chosen at run time by dispatch.cpp.
#define MLXC_ISA_NS avx512vnni
#include "kernels_x86.inc"

namespace mlxc_native {
const KernelSet* kernels_avx512vnni() {
  static const KernelSet k{"avx512vnni", avx512vnni::qmm_int8, avx512vnni::qmm_float, avx512vnni::qmm_int8_tiles,
                             avx512vnni::qmm_int8_packed};
  return &k;
}
}  // namespace mlxc_native
