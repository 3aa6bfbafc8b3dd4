#include "parallel.h"

#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MLXC_PAUSE() _mm_pause()
#else
#define MLXC_PAUSE() std::this_thread::yield()
#endif

namespace mlxc_native {
namespace {

constexpr uint32_t kClosed = 1u << 31;

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t nchunks, int threads, const std::function<void(int64_t)>& body) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || threads <= 1 || nchunks <= 1) {  // another stream is using the pool: run here
      for (int64_t i = 0; i < nchunks; ++i) body(i);
      return;
    }
    ensure_workers(threads - 1);
    body_ = &body;
    nchunks_ = nchunks;
    next_.store(0, std::memory_order_relaxed);
    state_.store(0, std::memory_order_release);  // open: helpers may join
    {
      std::lock_guard<std::mutex> l(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    state_.fetch_or(kClosed, std::memory_order_acq_rel);  // no late joiners
    for (int spins = 0; (state_.load(std::memory_order_acquire) & ~kClosed) != 0; ++spins) {
      if (spins < 20000) MLXC_PAUSE(); else std::this_thread::yield();
    }
  }

  std::atomic<int> spin_us{20};

 private:
  void work() {
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < nchunks_;) (*body_)(i);
  }

  bool join() {
    uint32_t s = state_.load(std::memory_order_acquire);
    while (!(s & kClosed)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) workers_.emplace_back([this] { loop(); });
  }

  void loop() {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // spin a little for the next job, then sleep
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us.load(std::memory_order_relaxed));
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        if ((++spins & 63) == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> l(mu_);
          cv_.wait(l, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          break;
        }
        MLXC_PAUSE();
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      if (join()) {
        work();
        state_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<uint32_t> state_{kClosed};  // kClosed bit | number of helpers inside the current job
  std::atomic<int64_t> next_{0};
  int64_t nchunks_ = 0;
  const std::function<void(int64_t)>* body_ = nullptr;
  std::atomic<bool> stop_{false};
};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end;
  long n = std::strtol(v, &end, 10);
  return (*end == 0 && n >= 0) ? static_cast<int>(n) : fallback;
}

std::atomic<int> g_threads{0};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit can deadlock.
  static Pool* p = [] {
    auto* q = new Pool();
    q->spin_us.store(env_int("MLXC_NATIVE_SPIN_US", 20));
    return q;
  }();
  return *p;
}

}  // namespace

int default_threads() {
  int n = env_int("MLXC_NATIVE_THREADS", 0);
  if (n > 0) return n;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  return n > 0 ? n : 1;
}

int get_threads() {
  int n = g_threads.load();
  if (n == 0) {
    n = default_threads();
    g_threads.store(n);
  }
  return n;
}

void set_threads(int n) { g_threads.store(n > 0 ? n : default_threads()); }

int get_spin_us() { return pool().spin_us.load(); }

void set_spin_us(int us) { pool().spin_us = us < 0 ? 0 : us; }

void parallel_for(int64_t nchunks, int threads, const std::function<void(int64_t)>& body) {
  pool().run(nchunks, threads, body);
}

}  // namespace mlxc_native
