// The selective scan's loop compiled with the avx2 flags only (see CMakeLists.txt); scan.cpp chooses at run time.
#define MLXC_SCAN_KERNEL_ONLY 1
#define MLXC_HAVE_X86 1
#define MLXC_SCAN_NS avx2
#include "scan_kernel.inc"
