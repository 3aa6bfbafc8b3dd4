// Which kernel set runs: the best the CPU supports (checked at run time: __builtin_cpu_supports on x86-64, the
// kernel's hardware capabilities on arm64), or one chosen by name (MLXC_NATIVE_ISA or set_isa, for tests and
// benchmarks).
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace mlxc_native {

const KernelSet& active_kernels();
std::vector<std::string> supported_isas();  // best first; always ends with "scalar"
bool set_isa(const std::string& name);      // "" or "auto": the best; false if the CPU cannot run it

}  // namespace mlxc_native
