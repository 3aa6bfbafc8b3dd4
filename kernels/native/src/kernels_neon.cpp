// Compiled for ARMv8.0 Advanced SIMD (every arm64 CPU; see CMakeLists.txt); chosen at run time by dispatch.cpp.
#define MLXC_ISA_NS neon
#define MLXC_ARM_SDOT 0
#include "kernels_arm.inc"

namespace mlxc_native {
const KernelSet* kernels_neon() {
  static const KernelSet k{"neon", neon::qmm_int8, neon::qmm_float, nullptr, neon::qmm_int8_packed};
  return &k;
}
}  // namespace mlxc_native
