// Compiled with ARMv8.2's dot product instructions (see CMakeLists.txt); chosen at run time by dispatch.cpp when the
// CPU has them.
#define MLXC_ISA_NS neon_dotprod
#define MLXC_ARM_SDOT 1
#include "kernels_arm.inc"

namespace mlxc_native {
const KernelSet* kernels_neon_dotprod() {
  static const KernelSet k{"neon_dotprod", neon_dotprod::qmm_int8, neon_dotprod::qmm_float, nullptr,
                           neon_dotprod::qmm_int8_packed};
  return &k;
}
}  // namespace mlxc_native
