#include "dispatch.h"

#include <atomic>
#include <cstdlib>

namespace mlxc_native {

#if !MLXC_HAVE_X86
const KernelSet* kernels_avx2() { return nullptr; }
const KernelSet* kernels_avx512() { return nullptr; }
const KernelSet* kernels_avx512vnni() { return nullptr; }
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
bool always() { return true; }

const Candidate kCandidates[] = {
    {"avx512vnni", kernels_avx512vnni, has_avx512vnni},
    {"avx512", kernels_avx512, has_avx512},
    {"avx2", kernels_avx2, has_avx2},
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
