// Runs the native quantized kernels without MLX, for machines the test host is not: tests/test_native_arm.py builds
// this with the sources the extension builds from (common.cpp, dispatch.cpp and an architecture's kernel units) for
// arm64 and runs it under qemu-aarch64.
//
//   kernel_harness --isas          the kernel sets this CPU runs, best first, one per line
//   kernel_harness DIR             runs the case in DIR with every kernel set this CPU runs
//
// DIR holds case.txt ("M N K bits group_size scale_type mode chunk_rows": scale_type 0 float32 / 1 float16, mode
// int8 | float | packed, chunk_rows the rows per kernel call, as the extension's threads split N) and the raw
// little-endian arrays x.bin (M x K float32), codes.bin, scales.bin and biases.bin in the kernels' layout (packed:
// kernels/native's `pack`). It writes y_<isa>.bin (M x N float32) per kernel set, and q.bin / d.bin, the int8
// activations the integer paths used, so the test's reference can use exactly the activations they saw.
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernels.h"

using namespace mlxc_native;

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::cerr << "cannot read " << path << "\n";
    std::exit(2);
  }
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) {
    std::cerr << "cannot write " << path << "\n";
    std::exit(2);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: kernel_harness --isas | DIR\n";
    return 2;
  }
  const std::string arg = argv[1];
  if (arg == "--isas") {
    for (const auto& name : supported_isas()) std::cout << name << "\n";
    return 0;
  }
  std::ifstream meta(arg + "/case.txt");
  int64_t M, N;
  int K, bits, group_size, scale_type, chunk_rows;
  std::string mode;
  if (!(meta >> M >> N >> K >> bits >> group_size >> scale_type >> mode >> chunk_rows) || chunk_rows <= 0) {
    std::cerr << "malformed " << arg << "/case.txt\n";
    return 2;
  }
  const bool packed = mode == "packed", int8 = mode != "float";
  const std::vector<char> x = read_file(arg + "/x.bin"), codes = read_file(arg + "/codes.bin"),
                          scales = read_file(arg + "/scales.bin"), biases = read_file(arg + "/biases.bin");
  if (x.size() != static_cast<size_t>(M) * K * sizeof(float)) {
    std::cerr << "x.bin holds " << x.size() << " bytes, not M x K floats\n";
    return 2;
  }

  // activations prepared as the extension's run_qmatmul does (packed kernels take them in natural order)
  const int nb = K / 32, G = K / group_size;
  std::vector<int8_t> q(int8 ? M * K : 0);
  std::vector<float> d(int8 ? M * nb : 0), xf(int8 ? 0 : M * K), gsum(M * G);
  prepare_acts(reinterpret_cast<const float*>(x.data()), M, K, bits, group_size, int8, !int8, q.data(), d.data(),
               xf.data(), gsum.data(), packed);
  if (int8) {
    write_file(arg + "/q.bin", q.data(), q.size());
    write_file(arg + "/d.bin", d.data(), d.size() * sizeof(float));
  }
  const QWeight w{reinterpret_cast<const uint8_t*>(codes.data()), scales.data(), biases.data(),
                  scale_type == 1 ? FloatType::f16 : FloatType::f32, N, K, bits, group_size};
  const QActs a{M, K, q.data(), d.data(), xf.data(), gsum.data()};

  for (const auto& name : supported_isas()) {
    if (!set_isa(name)) return 3;
    const KernelSet& ks = active_kernels();
    const QmmFn fn = packed ? ks.qmm_int8_packed : int8 ? ks.qmm_int8 : ks.qmm_float;
    std::vector<float> y(M * N, -12345.f);  // a value no kernel writes: rows left out show
    // last chunk first: a kernel writing past its chunk's end would be overwritten by the next chunk in order
    for (int64_t n0 = (N - 1) / chunk_rows * chunk_rows; n0 >= 0; n0 -= chunk_rows)
      fn(w, a, y.data(), N, n0, n0 + chunk_rows < N ? n0 + chunk_rows : N);
    write_file(arg + "/y_" + name + ".bin", y.data(), y.size() * sizeof(float));
  }
  return 0;
}
