// The emulator's runtime: runs one kernel translation unit over a grid, one threadgroup at a time, every GPU thread a
// stackful fiber, with Metal's barrier and SIMD-group semantics. Compiled once (cached) and linked with each kernel.
//
//   ./kernel REQUEST RESPONSE      REQUEST: buffers, grid, threadgroup, runs (see emulator.py, `_request`)
//                                  RESPONSE: every output of every run, in order
// Findings go to stdout, one per line: `FATAL <kind>\t<message>` (the run stopped) or `GUARD <kind>\t<message>`.
// Fatal findings exit with status 3; a clean run exits 0.
//
// Scheduling: the fibers of a group run in the run's order until each blocks (at a barrier or a SIMD call) or
// returns. Then, for every SIMD-group whose live lanes all wait at the same SIMD call, the collective is computed
// and those lanes become runnable; lanes of one SIMD-group waiting at different calls are divergence. When nothing
// is runnable and every live thread waits at the same threadgroup_barrier, the barrier releases. What Metal leaves
// unspecified is decided by the options the request carries (emulator.py, `Choices`), nowhere else.

#include "mlxc_rt.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace {

// ------------------------------------------------------------------------------------------------ fibers

#if defined(__x86_64__)
// switch(save, to): saves callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save and continues on `to`'s stack. A third of a microsecond per switch; ucontext makes a
// signal-mask system call on every switch.
extern "C" void mlxc_switch(void** save, void* to);
asm(R"(
  .text
  .globl mlxc_switch
  .type mlxc_switch,@function
mlxc_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mlxc_switch,.-mlxc_switch
)");
#endif

enum State { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };

struct Thread {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;  // usable part; a PROT_NONE page lies below it
  State state = DONE;
  unsigned line = 0, col = 0;  // where it waits
  MlxcAttrs attrs{};
  bool exists = false;  // false for the holes of a dispatched-size partial group
  // pending SIMD call
  MlxcSimdExec exec = nullptr;
  int quad = 0;
  MlxcLane lane{};
};

struct Buffer {
  std::string name;
  bool output = false;
  size_t nbytes = 0, itemsize = 1;
  char* base = nullptr;  // mmap'd region, guard page first
  size_t region = 0;
  char* data = nullptr;
  size_t data_pages_end = 0;  // offset of the trailing guard zone from base
  size_t front = 0;           // offset of the first data page from base
  std::vector<char> input;    // an input's bytes
  std::vector<char> init;     // an output's init value (one element), empty for none
};

struct Run {
  uint32_t thread_order = 0, group_order = 0;
  uint64_t seed = 0;
  uint8_t out_fill = 0xFF, tg_fill = 0xFF;
};

constexpr size_t kFront = 64;
constexpr uint8_t kGuard = 0xA5;
size_t g_page = 4096;

std::vector<Buffer> g_buffers;
std::vector<void*> g_buffer_ptrs;
uint32_t g_grid[3], g_tg[3];
std::vector<Run> g_runs;
uint32_t g_exited_at_barrier_ok = 0, g_partial_dispatched = 0, g_tg_limit = 32768, g_timeout = 60, g_stack_kib = 64;

std::vector<Thread> g_threads;
size_t g_stack_bytes = 0;
char* g_stacks = nullptr;
size_t g_stacks_len = 0;
Thread* g_cur = nullptr;
#if defined(__x86_64__)
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_ctx;
#endif
uint32_t g_group[3];
int g_run = 0;
unsigned char g_poison[64];

// threadgroup memory of the current group
std::vector<char> g_tg_mem;
size_t g_tg_used = 0;
std::vector<std::pair<int, size_t>> g_tg_slots;  // (declaration id, offset)

[[noreturn]] void fatal(const char* kind, const char* fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  for (char* c = msg; *c; ++c)
    if (*c == '\n' || *c == '\t') *c = ' ';
  printf("FATAL %s\t%s\n", kind, msg);
  fflush(stdout);
  _exit(3);
}

std::string where(const Thread* t) {
  char buf[160];
  if (!t) return "outside any GPU thread";
  snprintf(buf, sizeof buf, "thread_position_in_grid (%u, %u, %u), threadgroup (%u, %u, %u)",
           t->attrs.thread_position_in_grid[0], t->attrs.thread_position_in_grid[1],
           t->attrs.thread_position_in_grid[2], g_group[0], g_group[1], g_group[2]);
  return buf;
}

void switch_to_scheduler(Thread* t) {
#if defined(__x86_64__)
  mlxc_switch(&t->sp, g_sched_sp);
#else
  swapcontext(&t->ctx, &g_sched_ctx);
#endif
}

void resume(Thread* t) {
  g_cur = t;
#if defined(__x86_64__)
  mlxc_switch(&g_sched_sp, t->sp);
#else
  swapcontext(&g_sched_ctx, &t->ctx);
#endif
  g_cur = nullptr;
}

void fiber_main() {
  Thread* t = g_cur;
  mlxc_kernel_entry(g_buffer_ptrs.data(), &t->attrs);
  t->state = DONE;
  switch_to_scheduler(t);
  __builtin_unreachable();
}

void start_fiber(Thread* t) {
#if defined(__x86_64__)
  // The fiber starts by "returning" into fiber_main with the stack aligned as after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(t->stack) + g_stack_bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                    // fiber_main's return address: never used
  *--sp = reinterpret_cast<void*>(&fiber_main);       // where mlxc_switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;        // rbp rbx r12 r13 r14 r15
  *--sp = nullptr;                                    // MXCSR + x87 control word
  uint32_t* ctl = reinterpret_cast<uint32_t*>(sp);
  ctl[0] = 0x1F80;
  ctl[1] = 0x037F;
  t->sp = sp;
#else
  getcontext(&t->ctx);
  t->ctx.uc_stack.ss_sp = t->stack;
  t->ctx.uc_stack.ss_size = g_stack_bytes;
  t->ctx.uc_link = nullptr;
  makecontext(&t->ctx, fiber_main, 0);
#endif
  t->state = RUNNABLE;
}

// ------------------------------------------------------------------------------------------------ signals

void on_signal(int sig, siginfo_t* info, void* uctx) {
  const char* addr = static_cast<const char*>(info->si_addr);
  bool write = false;
#if defined(__x86_64__) && defined(REG_ERR)
  write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
  (void)uctx;
#endif
  std::string who = where(g_cur);
  if (sig == SIGSEGV || sig == SIGBUS) {
    for (const Buffer& b : g_buffers) {
      if (addr >= b.base && addr < b.base + b.region) {
        long off = static_cast<long>(addr - b.data);
        fatal(write ? "out-of-bounds-write" : "out-of-bounds-read",
              "%s %s '%s' at byte %ld (it holds %zu bytes), by %s", write ? "write to" : "read of",
              b.output ? "output" : "input", b.name.c_str(), off, b.nbytes, who.c_str());
      }
    }
    if (g_stacks && addr >= g_stacks && addr < g_stacks + g_stacks_len)
      fatal("stack-overflow", "a GPU thread overflowed its %u KiB stack (%s)", g_stack_kib, who.c_str());
    fatal("crash", "invalid memory access at %p (%s)", info->si_addr, who.c_str());
  }
  if (sig == SIGALRM)
    fatal("deadlock", "no progress in %u s: a thread never reaches a barrier or finishes (spinning on memory "
          "another thread should write?); last running: %s", g_timeout, who.c_str());
  if (sig == SIGFPE) fatal("crash", "arithmetic exception (integer division by zero?) in %s", who.c_str());
  fatal("crash", "signal %d in %s", sig, who.c_str());
}

void install_signals() {
  static char altstack[1 << 16];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int s : {SIGSEGV, SIGBUS, SIGALRM, SIGFPE, SIGILL, SIGABRT}) sigaction(s, &sa, nullptr);
}

// ------------------------------------------------------------------------------------------------ memory

// [guard zone][64 guard bytes][data][guard bytes to the page end][guard zone]; the zones are PROT_NONE (1 MiB,
// or the buffer's size if larger: address space only), so even far-off reads fault instead of reading neighbours.
void map_buffer(Buffer& b) {
  size_t need = kFront + b.nbytes + 64;
  size_t data_pages = (need + g_page - 1) / g_page;
  size_t zone = std::max<size_t>(size_t(1) << 20, (b.nbytes + g_page - 1) / g_page * g_page);
  b.region = data_pages * g_page + 2 * zone;
  void* p = mmap(nullptr, b.region, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fatal("internal", "mmap of %zu bytes failed", b.region);
  b.base = static_cast<char*>(p);
  mprotect(b.base + zone, data_pages * g_page, PROT_READ | PROT_WRITE);
  b.data_pages_end = zone + data_pages * g_page;
  b.front = zone;
  b.data = b.base + zone + kFront;
}

void fill_buffer(Buffer& b, const Run& r) {
  memset(b.base + b.front, kGuard, b.data_pages_end - b.front);
  if (!b.output) {
    if (b.nbytes) memcpy(b.data, b.input.data(), b.nbytes);
  } else if (!b.init.empty()) {
    for (size_t i = 0; i + b.itemsize <= b.nbytes; i += b.itemsize) memcpy(b.data + i, b.init.data(), b.itemsize);
  } else {
    memset(b.data, r.out_fill, b.nbytes);
  }
}

void check_guards(const Buffer& b) {
  const unsigned char* front = reinterpret_cast<const unsigned char*>(b.base + b.front);
  for (size_t i = 0; i < kFront; ++i)
    if (front[i] != kGuard) {
      printf("GUARD out-of-bounds-write\twrite before the start of %s '%s' (byte %ld)\n",
             b.output ? "output" : "input", b.name.c_str(), static_cast<long>(i) - static_cast<long>(kFront));
      return;
    }
  const unsigned char* tail = reinterpret_cast<const unsigned char*>(b.data + b.nbytes);
  size_t n = static_cast<size_t>(b.base + b.data_pages_end - (b.data + b.nbytes));
  for (size_t i = 0; i < n; ++i)
    if (tail[i] != kGuard) {
      printf("GUARD out-of-bounds-write\twrite past the end of %s '%s' (byte %zu; it holds %zu bytes)\n",
             b.output ? "output" : "input", b.name.c_str(), b.nbytes + i, b.nbytes);
      return;
    }
}

// ------------------------------------------------------------------------------------------------ scheduling

std::vector<int> ordering(size_t n, uint32_t how, std::mt19937_64& rng) {
  std::vector<int> o(n);
  for (size_t i = 0; i < n; ++i) o[i] = static_cast<int>(i);
  if (how == 1) std::reverse(o.begin(), o.end());
  if (how == 2) std::shuffle(o.begin(), o.end(), rng);
  return o;
}

void run_group(const Run& run, const uint32_t gid[3], const uint32_t ngroups[3], std::mt19937_64& rng) {
  uint32_t actual[3];
  for (int d = 0; d < 3; ++d) actual[d] = std::min(g_tg[d], g_grid[d] - gid[d] * g_tg[d]);
  // linearisation: Choices.partial_threadgroups
  const uint32_t* dims = g_partial_dispatched ? g_tg : actual;
  size_t slots = static_cast<size_t>(dims[0]) * dims[1] * dims[2];
  size_t nthreads = static_cast<size_t>(actual[0]) * actual[1] * actual[2];
  uint32_t nsimd = static_cast<uint32_t>((slots + 31) / 32);
  uint32_t full = g_tg[0] * g_tg[1] * g_tg[2];

  g_tg_used = 0;
  g_tg_slots.clear();
  for (size_t i = 0; i < slots; ++i) {
    Thread& t = g_threads[i];
    uint32_t x = static_cast<uint32_t>(i % dims[0]);
    uint32_t y = static_cast<uint32_t>((i / dims[0]) % dims[1]);
    uint32_t z = static_cast<uint32_t>(i / (static_cast<size_t>(dims[0]) * dims[1]));
    t.exists = x < actual[0] && y < actual[1] && z < actual[2];
    t.state = DONE;
    if (!t.exists) continue;
    MlxcAttrs& a = t.attrs;
    uint32_t local[3] = {x, y, z};
    for (int d = 0; d < 3; ++d) {
      a.thread_position_in_threadgroup[d] = local[d];
      a.threadgroup_position_in_grid[d] = gid[d];
      a.thread_position_in_grid[d] = gid[d] * g_tg[d] + local[d];
      a.threads_per_threadgroup[d] = dims[d];
      a.dispatch_threads_per_threadgroup[d] = g_tg[d];
      a.threadgroups_per_grid[d] = ngroups[d];
      a.threads_per_grid[d] = g_grid[d];
      a.grid_size[d] = g_grid[d];
      a.grid_origin[d] = 0;
    }
    a.thread_index_in_threadgroup = static_cast<uint32_t>(i);
    a.thread_index_in_simdgroup = static_cast<uint32_t>(i % 32);
    a.simdgroup_index_in_threadgroup = static_cast<uint32_t>(i / 32);
    a.simdgroups_per_threadgroup = nsimd;
    a.dispatch_simdgroups_per_threadgroup = (full + 31) / 32;
    a.threads_per_simdgroup = 32;
    a.thread_execution_width = 32;
    a.thread_index_in_quadgroup = static_cast<uint32_t>(i % 4);
    a.quadgroup_index_in_threadgroup = static_cast<uint32_t>(i / 4);
    a.quadgroups_per_threadgroup = static_cast<uint32_t>((slots + 3) / 4);
    a.dispatch_quadgroups_per_threadgroup = (full + 3) / 4;
    start_fiber(&t);
  }
  (void)nthreads;

  std::vector<int> order = ordering(slots, run.thread_order, rng);
  for (;;) {
    for (int idx : order) {
      Thread* t = &g_threads[idx];
      if (t->exists && t->state == RUNNABLE) resume(t);
    }
    // SIMD-group collectives
    bool progressed = false;
    for (uint32_t s = 0; s < nsimd; ++s) {
      Thread* lanes = &g_threads[s * 32];
      size_t nl = std::min<size_t>(32, slots - s * 32);
      int at_simd = 0, at_barrier = 0, live = 0;
      Thread* first = nullptr;
      for (size_t l = 0; l < nl; ++l) {
        Thread& t = lanes[l];
        if (!t.exists || t.state == DONE) continue;
        ++live;
        if (t.state == AT_SIMD) {
          ++at_simd;
          if (!first) first = &t;
        } else if (t.state == AT_BARRIER) {
          ++at_barrier;
        }
      }
      if (at_simd == 0) continue;
      if (at_barrier > 0) {
        Thread* b = nullptr;
        for (size_t l = 0; l < nl; ++l)
          if (lanes[l].exists && lanes[l].state == AT_BARRIER) { b = &lanes[l]; break; }
        g_cur = first;
        fatal("simd-divergence",
              "in SIMD-group %u some lanes wait at a SIMD call (line %u:%u) while others wait at "
              "threadgroup_barrier (line %u:%u); %s", s, first->line, first->col, b->line, b->col,
              where(first).c_str());
      }
      // every live lane waits at a SIMD call: all at the same one?
      for (size_t l = 0; l < nl; ++l) {
        Thread& t = lanes[l];
        if (!t.exists || t.state != AT_SIMD) continue;
        if (t.line != first->line || t.col != first->col || t.exec != first->exec || t.quad != first->quad) {
          g_cur = &t;
          fatal("simd-divergence",
                "lanes of SIMD-group %u wait at different SIMD calls (line %u:%u and line %u:%u): a SIMD "
                "function in divergent control flow; %s", s, first->line, first->col, t.line, t.col,
                where(&t).c_str());
        }
      }
      MlxcLane L[32];
      int act[32];
      for (int l = 0; l < 32; ++l) {
        act[l] = 0;
        L[l] = MlxcLane{nullptr, nullptr, nullptr, 0};
        if (static_cast<size_t>(l) < nl && lanes[l].exists && lanes[l].state == AT_SIMD) {
          act[l] = 1;
          L[l] = lanes[l].lane;
        }
      }
      first->exec(L, act, g_poison);
      for (size_t l = 0; l < nl; ++l)
        if (act[l]) lanes[l].state = RUNNABLE;
      progressed = true;
    }
    if (progressed) continue;
    // threadgroup barrier
    int live = 0, waiting = 0, exited = 0;
    Thread* first = nullptr;
    for (size_t i = 0; i < slots; ++i) {
      Thread& t = g_threads[i];
      if (!t.exists) continue;
      if (t.state == DONE) {
        ++exited;
        continue;
      }
      ++live;
      if (t.state == AT_BARRIER) {
        ++waiting;
        if (!first) first = &t;
      }
    }
    if (live == 0) break;
    if (waiting != live) fatal("internal", "scheduler stuck: %d live threads, %d at the barrier", live, waiting);
    for (size_t i = 0; i < slots; ++i) {
      Thread& t = g_threads[i];
      if (t.exists && t.state == AT_BARRIER && (t.line != first->line || t.col != first->col)) {
        g_cur = &t;
        fatal("barrier-divergence",
              "threads of one threadgroup wait at different threadgroup_barrier calls (line %u:%u and line "
              "%u:%u): a barrier in divergent control flow; %s", first->line, first->col, t.line, t.col,
              where(&t).c_str());
      }
    }
    if (exited > 0 && !g_exited_at_barrier_ok) {
      g_cur = first;
      fatal("deadlock",
            "%d threads wait at threadgroup_barrier (line %u:%u) that %d threads of their threadgroup will never "
            "reach (they returned): on a GPU the barrier may never release; %s", waiting, first->line,
            first->col, exited, where(first).c_str());
    }
    for (size_t i = 0; i < slots; ++i)
      if (g_threads[i].exists && g_threads[i].state == AT_BARRIER) g_threads[i].state = RUNNABLE;
  }
}

void run_grid(const Run& run) {
  uint32_t ngroups[3];
  for (int d = 0; d < 3; ++d) ngroups[d] = (g_grid[d] + g_tg[d] - 1) / g_tg[d];
  std::mt19937_64 rng(run.seed);
  size_t total = static_cast<size_t>(ngroups[0]) * ngroups[1] * ngroups[2];
  memset(g_poison, run.out_fill, sizeof g_poison);
  std::vector<int> order = ordering(total, run.group_order, rng);
  for (int gi : order) {
    size_t g = static_cast<size_t>(gi);
    g_group[0] = static_cast<uint32_t>(g % ngroups[0]);
    g_group[1] = static_cast<uint32_t>((g / ngroups[0]) % ngroups[1]);
    g_group[2] = static_cast<uint32_t>(g / (static_cast<size_t>(ngroups[0]) * ngroups[1]));
    run_group(run, g_group, ngroups, rng);
  }
}

// ------------------------------------------------------------------------------------------------ request

struct Reader {
  FILE* f;
  template <class T>
  T get() {
    T v;
    if (fread(&v, sizeof v, 1, f) != 1) fatal("internal", "truncated request");
    return v;
  }
  void bytes(void* p, size_t n) {
    if (n && fread(p, 1, n, f) != n) fatal("internal", "truncated request");
  }
};

}  // namespace

// ------------------------------------------------------------------------------------------------ ABI for kernels

extern "C" void mlxc_rt_threadgroup_barrier(unsigned line, unsigned col) {
  Thread* t = g_cur;
  t->state = AT_BARRIER;
  t->line = line;
  t->col = col;
  switch_to_scheduler(t);
}

extern "C" void mlxc_rt_simd(MlxcSimdExec exec, int quad, const void* in, const void* in2, void* out,
                             uint32_t arg, unsigned line, unsigned col) {
  Thread* t = g_cur;
  t->state = AT_SIMD;
  t->line = line;
  t->col = col;
  t->exec = exec;
  t->quad = quad;
  t->lane = MlxcLane{in, in2, out, arg};
  switch_to_scheduler(t);
}

extern "C" void* mlxc_rt_threadgroup_alloc(int id, size_t size, size_t align, unsigned line) {
  for (auto& s : g_tg_slots)
    if (s.first == id) return g_tg_mem.data() + s.second;
  size_t off = (g_tg_used + align - 1) / align * align;
  if (off + size > g_tg_limit)
    fatal("threadgroup-memory",
          "threadgroup memory of %zu bytes (the declaration at line %u adds %zu) exceeds the %u bytes a Metal "
          "threadgroup may use", off + size, line, size, g_tg_limit);
  if (g_tg_mem.size() < off + size) g_tg_mem.resize(std::max<size_t>(off + size, 65536));
  memset(g_tg_mem.data() + off, g_runs[g_run].tg_fill, size);
  g_tg_used = off + size;
  g_tg_slots.emplace_back(id, off);
  return g_tg_mem.data() + off;
}

extern "C" void mlxc_rt_fail(const char* kind, const char* message) {
  fatal(kind, "%s; %s", message, where(g_cur).c_str());
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s REQUEST RESPONSE\n", argv[0]);
    return 2;
  }
  g_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  install_signals();
  FILE* f = fopen(argv[1], "rb");
  if (!f) fatal("internal", "cannot open %s", argv[1]);
  Reader r{f};
  char magic[8];
  r.bytes(magic, 8);
  if (memcmp(magic, "MLXCEMU1", 8) != 0) fatal("internal", "bad request");
  uint32_t nbuf = r.get<uint32_t>();
  g_buffers.resize(nbuf);
  for (Buffer& b : g_buffers) {
    b.output = r.get<uint32_t>() == 1;
    b.nbytes = r.get<uint64_t>();
    b.itemsize = r.get<uint32_t>();
    uint32_t nl = r.get<uint32_t>();
    b.name.resize(nl);
    r.bytes(&b.name[0], nl);
    if (!b.output) {
      b.input.resize(b.nbytes);
      r.bytes(b.input.data(), b.nbytes);
    } else {
      uint32_t has_init = r.get<uint32_t>();
      if (has_init) {
        b.init.resize(b.itemsize);
        r.bytes(b.init.data(), b.itemsize);
      }
    }
  }
  for (int d = 0; d < 3; ++d) g_grid[d] = r.get<uint32_t>();
  for (int d = 0; d < 3; ++d) g_tg[d] = r.get<uint32_t>();
  uint32_t nruns = r.get<uint32_t>();
  g_runs.resize(nruns);
  for (Run& run : g_runs) {
    run.thread_order = r.get<uint32_t>();
    run.group_order = r.get<uint32_t>();
    run.seed = r.get<uint64_t>();
    run.out_fill = r.get<uint8_t>();
    run.tg_fill = r.get<uint8_t>();
  }
  g_exited_at_barrier_ok = r.get<uint32_t>();
  g_partial_dispatched = r.get<uint32_t>();
  g_tg_limit = r.get<uint32_t>();
  g_timeout = r.get<uint32_t>();
  g_stack_kib = r.get<uint32_t>();
  fclose(f);

  for (Buffer& b : g_buffers) map_buffer(b);
  g_buffer_ptrs.resize(nbuf);
  for (uint32_t i = 0; i < nbuf; ++i) g_buffer_ptrs[i] = g_buffers[i].data;

  // one stack per thread of a group, each above a PROT_NONE page
  size_t per_group = static_cast<size_t>(g_tg[0]) * g_tg[1] * g_tg[2];
  g_stack_bytes = static_cast<size_t>(g_stack_kib) * 1024;
  size_t slot = g_stack_bytes + g_page;
  g_stacks_len = slot * per_group;
  void* st = mmap(nullptr, g_stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (st == MAP_FAILED) fatal("internal", "cannot map %zu bytes of fiber stacks", g_stacks_len);
  g_stacks = static_cast<char*>(st);
  g_threads.resize(per_group);
  for (size_t i = 0; i < per_group; ++i) {
    mprotect(g_stacks + i * slot, g_page, PROT_NONE);
    g_threads[i].stack = g_stacks + i * slot + g_page;
  }

  FILE* out = fopen(argv[2], "wb");
  if (!out) fatal("internal", "cannot open %s", argv[2]);
  alarm(g_timeout);
  for (g_run = 0; g_run < static_cast<int>(nruns); ++g_run) {
    for (Buffer& b : g_buffers) fill_buffer(b, g_runs[g_run]);
    run_grid(g_runs[g_run]);
    for (const Buffer& b : g_buffers) check_guards(b);
    for (const Buffer& b : g_buffers)
      if (b.output && b.nbytes) fwrite(b.data, 1, b.nbytes, out);
  }
  alarm(0);
  fclose(out);
  fflush(stdout);
  return 0;
}
