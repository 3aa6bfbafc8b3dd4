// The float matrix-vector kernel with the avx2 flags only (see CMakeLists.txt); gemv.cpp chooses at run time.
#define MLXC_GEMV_KERNEL_ONLY 1
#define MLXC_HAVE_X86 1
#define MLXC_GEMV_NS avx2
#include "gemv_kernel.inc"
