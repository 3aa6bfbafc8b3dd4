#include "dispatch.h"

#include <atomic>
#include <cstdlib>

#if MLXC_HAVE_ARM && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace mlxc_native {

#if !MLXC_HAVE_X86
const KernelSet* kernels_avx2() { return nullptr; }
const KernelSet* kernels_avx512() { return nullptr; }
const KernelSet* kernels_avx512vnni() { return nullptr; }
#endif
#if !MLXC_HAVE_ARM
const KernelSet* kernels_neon() { return nullptr; }
const KernelSet* kernels_neon_dotprod() { return nullptr; }
#endif

namespace {

struct Candidate {
  const char* name;
  const KernelSet* (*get)();
  bool (*cpu_ok)();
};

#if MLXC_HAVE_X86
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
bool has_avx512vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
#else
bool has_avx2() { return false; }
bool has_avx512() { return false; }
bool has_avx512vnni() { return false; }
#endif

#if MLXC_HAVE_ARM
bool has_neon() { return true; }  // Advanced SIMD is part of the arm64 baseline
bool has_neon_dotprod() {
#if defined(__linux__)
  constexpr unsigned long kAsimdDp = 1ul << 20;  // HWCAP_ASIMDDP in the kernel's asm/hwcap.h
  return (getauxval(AT_HWCAP) & kAsimdDp) != 0;
#elif defined(__APPLE__)
  return true;  // every arm64 Mac (M1 on) has it, and macOS 11 has no sysctl key that says so
#else
  return false;
#endif
}
#else
bool has_neon() { return false; }
bool has_neon_dotprod() { return false; }
#endif
bool always() { return true; }

const Candidate kCandidates[] = {
    {"avx512vnni", kernels_avx512vnni, has_avx512vnni},
    {"avx512", kernels_avx512, has_avx512},
    {"avx2", kernels_avx2, has_avx2},
    {"neon_dotprod", kernels_neon_dotprod, has_neon_dotprod},
    {"neon", kernels_neon, has_neon},
    {"scalar", kernels_scalar, always},
};

const KernelSet* find(const std::string& name) {
  for (const auto& c : kCandidates) {
    if ((name.empty() || name == "auto" || name == c.name) && c.cpu_ok() && c.get() != nullptr) return c.get();
  }
  return nullptr;
}

std::atomic<const KernelSet*> g_active{nullptr};

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const auto& c : kCandidates)
    if (c.cpu_ok() && c.get() != nullptr) out.emplace_back(c.name);
  return out;
}

bool set_isa(const std::string& name) {
  const KernelSet* k = find(name);
  if (k == nullptr) return false;
  g_active.store(k);
  return true;
}

const KernelSet& active_kernels() {
  const KernelSet* k = g_active.load();
  if (k == nullptr) {
    const char* env = std::getenv("MLXC_NATIVE_ISA");
    k = find(env ? env : "");
    if (k == nullptr) k = find("");
    g_active.store(k);
  }
  return *k;
}

}  // namespace mlxc_native
