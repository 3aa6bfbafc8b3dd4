// A small fork-join pool for the kernels. MLX runs a primitive's work on its CPU stream thread; that thread takes
// part in every job and a few helper threads (threads - 1) join it. Work is split into chunks claimed from one atomic
// counter, so a helper that is descheduled holds up at most one chunk, and the caller never waits for a helper that
// has not started: when the caller runs out of chunks it closes the job and waits only for helpers that joined.
// Idle helpers spin briefly (spin_us, MLXC_NATIVE_SPIN_US, default 20) for the next job, then sleep on a condition
// variable: on 2 shared cores longer spins measured slower (they take the core from MLX's own threads).
#pragma once

#include <cstdint>
#include <functional>

namespace mlxc_native {

// Run body(chunk) for chunk in [0, nchunks), on up to `threads` threads (the caller included).
void parallel_for(int64_t nchunks, int threads, const std::function<void(int64_t)>& body);

int default_threads();       // CPUs this process may run on (sched_getaffinity), or MLXC_NATIVE_THREADS
int get_threads();
void set_threads(int n);     // 1 runs everything on the calling thread
int get_spin_us();
void set_spin_us(int us);

}  // namespace mlxc_native
