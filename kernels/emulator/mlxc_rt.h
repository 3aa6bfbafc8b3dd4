// The ABI between the emulator's runtime (runtime.cpp, compiled once) and a kernel translation unit (the prelude
// metal.h + MLX's generated source + a generated launcher). Plain C types only: each side has its own view of Metal.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Every thread-position attribute MLX can add to a signature, as the runtime computes them for one GPU thread.
typedef struct MlxcAttrs {
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threads_per_threadgroup[3];
  uint32_t dispatch_threads_per_threadgroup[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t grid_size[3];
  uint32_t grid_origin[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t threads_per_simdgroup;
  uint32_t thread_execution_width;
  uint32_t thread_index_in_quadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
} MlxcAttrs;

// One lane's part in a SIMD-group (or quad-group) collective: pointers into the lane's own (blocked) fiber stack.
typedef struct MlxcLane {
  const void* in;
  const void* in2;
  void* out;
  uint32_t arg;
} MlxcLane;

// Computes a collective for one SIMD-group: lanes[i] is lane i, active[i] whether it takes part (live, and at this
// call); writes `out` of every active lane. `poison` points at >= 64 bytes of the run's poison pattern, the value an
// undefined result gets (a shuffle from an inactive lane).
typedef void (*MlxcSimdExec)(MlxcLane* lanes, const int* active, const void* poison);

// Blocking calls a GPU thread makes; `line`/`col` locate the call in the kernel source (for divergence reports).
void mlxc_rt_threadgroup_barrier(unsigned line, unsigned col);
void mlxc_rt_simd(MlxcSimdExec exec, int quad, const void* in, const void* in2, void* out, uint32_t arg,
                  unsigned line, unsigned col);
// Threadgroup memory for declaration `id`: one block per threadgroup, shared by its threads, filled with the run's
// garbage pattern when the group starts.
void* mlxc_rt_threadgroup_alloc(int id, size_t size, size_t align, unsigned line);
// A fatal error detected by the prelude (something the emulator cannot model).
void mlxc_rt_fail(const char* kind, const char* message);

// Implemented by the kernel translation unit: run the kernel as one GPU thread.
void mlxc_kernel_entry(void** buffers, const MlxcAttrs* attrs);

#ifdef __cplusplus
}
#endif
