// cudaemu runtime: fibers, block schedulers, barriers, warp collectives, launches and the watchdog
// (see cuda_runtime.h for the execution model).
//
// Each block's OS thread runs a scheduler loop: it resumes its Ready fibers one after another in the configured
// order; a fiber runs until it blocks, records its request (barrier, warp collective, sleep, exit) in its own Fiber
// record and switches back. All bookkeeping happens on the scheduler's side, so no state is shared between fibers.
//
// ThreadSanitizer (built with -fsanitize=thread): every fiber is a TSan fiber, switched without synchronisation, so
// TSan sees the CUDA threads of a block as concurrent; barriers and warp collectives are release/acquire pairs on a
// per-generation sync object; the emulator's bookkeeping is excluded from race detection. Shared-memory races inside
// a block and global-memory races between blocks are then reported like races between threads.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#define CUDAEMU_TSAN 1
#else
#define CUDAEMU_TSAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cudaemu {
namespace {

// --- configuration -------------------------------------------------------------------------------------------------

struct Config {
  int order = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t seed = 0;
  double timeout_s = 120.0;
  int workers = 2;
  size_t stack_bytes = CUDAEMU_TSAN ? (512u << 10) : (128u << 10);
};

Config from_environment() {
  Config c;
  if (const char* s = std::getenv("CUDAEMU_SCHED")) {
    const std::string v(s);
    c.order = v == "rev" ? 1 : (v == "rand" ? 2 : 0);
  }
  if (const char* s = std::getenv("CUDAEMU_SEED")) c.seed = std::strtoull(s, nullptr, 10);
  if (const char* s = std::getenv("CUDAEMU_TIMEOUT")) c.timeout_s = std::atof(s);
  if (const char* s = std::getenv("CUDAEMU_WORKERS")) c.workers = std::max(1, std::atoi(s));
  return c;
}

Config g_config = from_environment();
std::atomic<uint64_t> g_launches{0};

// --- context switch ------------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// cudaemu_switch(save, next): pushes the callee-saved registers, stores the stack pointer to *save, loads `next` and
// pops the registers of the context saved there (System V x86-64 ABI: rbx, rbp, r12-r15 are callee-saved).
extern "C" void cudaemu_switch(void** save, void* next);
asm(R"(
  .text
  .globl cudaemu_switch
  .hidden cudaemu_switch
  .type cudaemu_switch, @function
cudaemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudaemu_switch, .-cudaemu_switch
)");
#endif

// --- blocks and fibers ---------------------------------------------------------------------------------------------

enum class State { Ready, Barrier, Warp, Sleep, Done };

// Collective kinds: 0-2 the shuffles and the ballot (warp_collective's kind), 3 a warp-uniform call (warp_uniform:
// __syncwarp, the nvcuda::wmma functions), named by the call.
const char* const kCollective[] = {"__shfl_xor_sync", "__shfl_down_sync", "__ballot_sync"};
constexpr int kUniform = 3;
constexpr int kMaxUniformArgs = 3;

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx{};
#endif
  char* stack = nullptr;
  State state = State::Ready;
  int tid = 0;
  // The pending request.
  int line = 0;
  const char* file = "";
  int kind = 0;
  const char* name = "";  // the collective's name in diagnoses
  unsigned mask = 0;
  uint32_t value = 0;
  int arg = 0;
  int nargs = 0;  // warp_uniform: the arguments every lane must pass alike, and their names
  uint64_t args[kMaxUniformArgs] = {0, 0, 0};
  const char* const* labels = nullptr;
  uint32_t result = 0;
  unsigned sync_generation = 0;
  void* tsan = nullptr;
};

struct Warp {
  unsigned arrived = 0;  // lanes waiting at the pending collective
  int line = 0;
  const char* file = "";
  int kind = 0;
  const char* name = "";
  unsigned mask = 0;
  unsigned generation = 0;
  char sync[2] = {0, 0};  // TSan sync objects, alternating by generation
};

struct Block {
  const char* name = "";
  dim3 index;
  int threads = 0;
  std::vector<Fiber>* fibers = nullptr;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_ctx{};
#endif
  void* scheduler_tsan = nullptr;
  const std::function<void()>* body = nullptr;
  int done = 0;
  int at_barrier = 0;
  int barrier_line = 0;
  const char* barrier_file = "";
  int barrier_sum = 0;
  unsigned barrier_generation = 0;
  char barrier_sync[2] = {0, 0};
  std::vector<Warp> warps;
  std::mt19937_64 rng;
};

thread_local Block* t_block = nullptr;

void ignore_begin() {
#if CUDAEMU_TSAN
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
}

void ignore_end() {
#if CUDAEMU_TSAN
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
#endif
}

[[noreturn]] void fail(const Block* b, const char* format, ...) {
  char message[2048];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof message, format, args);
  va_end(args);
  if (b != nullptr) {
    std::fprintf(stderr, "cudaemu: kernel %s, block (%u,%u,%u): %s\n", b->name, b->index.x, b->index.y, b->index.z,
                 message);
  } else {
    std::fprintf(stderr, "cudaemu: %s\n", message);
  }
  std::fflush(stderr);
  std::_Exit(86);
}

const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

std::string describe(const Block& b, const Fiber& f) {
  char text[256];
  switch (f.state) {
    case State::Ready:
      return "is running";
    case State::Sleep:
      return "spins (__nanosleep)";
    case State::Done:
      return "has exited";
    case State::Barrier:
      std::snprintf(text, sizeof text, "waits at the __syncthreads of %s:%d", base_name(f.file), f.line);
      return text;
    case State::Warp:
      std::snprintf(text, sizeof text, "waits at the %s of %s:%d (mask 0x%08x)", f.name, base_name(f.file), f.line,
                    f.mask);
      return text;
  }
  (void)b;
  return "?";
}

// Switches from the running fiber back to its block's scheduler. `sync`: the fiber is done (its writes happen
// before everything the scheduler does next, e.g. the next block on this OS thread).
void to_scheduler(Block* b, Fiber* f, bool sync) {
#if CUDAEMU_TSAN
  __tsan_switch_to_fiber(b->scheduler_tsan, sync ? 0 : __tsan_switch_to_fiber_no_sync);
#else
  (void)sync;
#endif
#if defined(__x86_64__)
  cudaemu_switch(&f->sp, b->scheduler_sp);
#else
  swapcontext(&f->ctx, &b->scheduler_ctx);
#endif
}

void to_fiber(Block* b, Fiber* f) {
  b->current = f;
  threadIdx = dim3(static_cast<unsigned>(f->tid) % blockDim.x,
                   static_cast<unsigned>(f->tid) / blockDim.x % blockDim.y,
                   static_cast<unsigned>(f->tid) / (blockDim.x * blockDim.y));
#if CUDAEMU_TSAN
  __tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  cudaemu_switch(&b->scheduler_sp, f->sp);
#else
  swapcontext(&b->scheduler_ctx, &f->ctx);
#endif
}

void fiber_entry() {
  Block* b = t_block;
  Fiber* f = b->current;
  (*b->body)();
  ignore_begin();
  f->state = State::Done;
  ignore_end();
  to_scheduler(b, f, true);
  __builtin_unreachable();
}

// --- requests, handled by the scheduler ----------------------------------------------------------------------------

void complete_barrier(Block* b) {
  for (Fiber& f : *b->fibers) {
    if (f.state == State::Barrier) {
      f.state = State::Ready;
      f.result = static_cast<uint32_t>(b->barrier_sum);
    }
  }
  b->at_barrier = 0;
  b->barrier_sum = 0;
  ++b->barrier_generation;
}

void check_barrier_not_abandoned(Block* b) {
  if (b->at_barrier == 0 || b->at_barrier + b->done < b->threads || b->done == 0) return;
  int exited = -1;
  for (const Fiber& f : *b->fibers) {
    if (f.state == State::Done) {
      exited = f.tid;
      break;
    }
  }
  fail(b, "thread %d exited while %d thread(s) wait at the __syncthreads of %s:%d (undefined on the GPU)", exited,
       b->at_barrier, base_name(b->barrier_file), b->barrier_line);
}

void arrive_barrier(Block* b, Fiber* f) {
  if (b->at_barrier == 0) {
    b->barrier_line = f->line;
    b->barrier_file = f->file;
  } else if (f->line != b->barrier_line || f->file != b->barrier_file) {
    fail(b, "thread %d reached the __syncthreads of %s:%d while %d thread(s) wait at the one of %s:%d "
            "(threads of a block reach different barriers)",
         f->tid, base_name(f->file), f->line, b->at_barrier, base_name(b->barrier_file), b->barrier_line);
  }
  ++b->at_barrier;
  b->barrier_sum += static_cast<int>(f->value);
  if (b->at_barrier == b->threads) {
    complete_barrier(b);
  } else {
    check_barrier_not_abandoned(b);
  }
}

// warp_uniform: every lane of the mask passed the same arguments (the first lane's).
void check_uniform(Block* b, const Warp& w, int warp) {
  const Fiber* lanes = b->fibers->data() + warp * 32;
  const int first = __builtin_ctz(w.mask);
  for (int l = first + 1; l < 32; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    for (int a = 0; a < lanes[first].nargs; ++a) {
      if (lanes[l].args[a] == lanes[first].args[a]) continue;
      fail(b, "lanes %d and %d of warp %d pass a different %s (0x%llx vs 0x%llx) to the %s of %s:%d: it must be the "
              "same in every lane",
           first, l, warp, lanes[first].labels[a], static_cast<unsigned long long>(lanes[first].args[a]),
           static_cast<unsigned long long>(lanes[l].args[a]), w.name, base_name(w.file), w.line);
    }
  }
}

void complete_warp(Block* b, Warp& w, int warp) {
  Fiber* lanes = b->fibers->data() + warp * 32;
  if (w.kind == kUniform) check_uniform(b, w, warp);
  uint32_t ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if ((w.mask >> l & 1u) && (lanes[l].value & 1u)) ballot |= 1u << l;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    Fiber& f = lanes[l];
    if (w.kind == 2 || w.kind == kUniform) {
      f.result = ballot;
      continue;
    }
    int src = w.kind == 0 ? (l ^ f.arg) : l + f.arg;
    if (src < 0 || src >= 32) src = l;  // shfl_down past the warp: the lane keeps its own value
    if (!(w.mask >> src & 1u)) {
      fail(b, "lane %d of warp %d reads lane %d, outside the mask 0x%08x, in the %s of %s:%d", l, warp, src, w.mask,
           w.name, base_name(w.file), w.line);
    }
    f.result = lanes[src].value;
  }
  for (int l = 0; l < 32; ++l) {
    if (w.mask >> l & 1u) lanes[l].state = State::Ready;
  }
  w.arrived = 0;
  ++w.generation;
}

void arrive_warp(Block* b, Fiber* f) {
  const int warp = f->tid / 32, lane = f->tid % 32;
  Warp& w = b->warps[static_cast<size_t>(warp)];
  const int lanes_in_warp = std::min(32, b->threads - warp * 32);
  const unsigned existing = lanes_in_warp == 32 ? 0xffffffffu : ((1u << lanes_in_warp) - 1u);
  if (!(f->mask >> lane & 1u)) {
    fail(b, "lane %d of warp %d calls the %s of %s:%d with mask 0x%08x, which leaves out the lane itself", lane, warp,
         f->name, base_name(f->file), f->line, f->mask);
  }
  if (f->mask & ~existing) {
    fail(b, "the %s of %s:%d names lanes that do not exist (mask 0x%08x, %d lanes in warp %d)", f->name,
         base_name(f->file), f->line, f->mask, lanes_in_warp, warp);
  }
  if (w.arrived == 0) {
    w.line = f->line;
    w.file = f->file;
    w.kind = f->kind;
    w.name = f->name;
    w.mask = f->mask;
  } else if (w.line != f->line || w.file != f->file || w.kind != f->kind || std::strcmp(w.name, f->name) != 0 ||
             w.mask != f->mask) {
    fail(b, "lane %d of warp %d reached the %s of %s:%d (mask 0x%08x) while lane(s) 0x%08x wait at the %s of %s:%d "
            "(mask 0x%08x): a warp collective in divergent code",
         lane, warp, f->name, base_name(f->file), f->line, f->mask, w.arrived, w.name, base_name(w.file), w.line,
         w.mask);
  }
  w.arrived |= 1u << lane;
  Fiber* lanes = b->fibers->data() + warp * 32;
  for (int l = 0; l < lanes_in_warp; ++l) {
    if ((w.mask >> l & 1u) && lanes[l].state == State::Done) {
      fail(b, "lane %d of warp %d exited while lane(s) 0x%08x wait at the %s of %s:%d (mask 0x%08x): undefined on "
              "the GPU",
           l, warp, w.arrived, w.name, base_name(w.file), w.line, w.mask);
    }
  }
  if (w.arrived == w.mask) complete_warp(b, w, warp);
}

void on_exit(Block* b, Fiber* f) {
  ++b->done;
  const int warp = f->tid / 32, lane = f->tid % 32;
  const Warp& w = b->warps[static_cast<size_t>(warp)];
  if (w.arrived != 0 && (w.mask >> lane & 1u)) {
    fail(b, "lane %d of warp %d exited while lane(s) 0x%08x wait at the %s of %s:%d (mask 0x%08x): undefined on the "
            "GPU",
         lane, warp, w.arrived, w.name, base_name(w.file), w.line, w.mask);
  }
  check_barrier_not_abandoned(b);
}

[[noreturn]] void report_deadlock(Block* b) {
  std::string text = "deadlock: no thread can run;";
  int listed = 0;
  for (const Fiber& f : *b->fibers) {
    if (f.state == State::Done) continue;
    if (listed++ == 8) {
      text += " ...";
      break;
    }
    text += " thread " + std::to_string(f.tid) + " " + describe(*b, f) + ";";
  }
  fail(b, "%s", text.c_str());
}

// --- one block ---------------------------------------------------------------------------------------------------

struct Stacks {
  char* memory = nullptr;
  size_t bytes = 0;
  size_t each = 0;
  int count = 0;

  void reserve(int threads, size_t stack_bytes) {
    if (threads <= count && stack_bytes == each) return;
    release();
    each = stack_bytes;
    count = threads;
    bytes = each * static_cast<size_t>(count);
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail(nullptr, "cannot map %zu bytes of fiber stacks", bytes);
    memory = static_cast<char*>(m);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (int t = 0; t < count; ++t) mprotect(memory + each * static_cast<size_t>(t), page, PROT_NONE);  // guard
  }
  void release() {
    if (memory != nullptr) munmap(memory, bytes);
    memory = nullptr;
    count = 0;
  }
  ~Stacks() { release(); }
};

struct Launch {
  const char* name;
  dim3 grid, block;
  size_t dynamic_bytes;
  const DynamicShared* shared;
  const std::function<void()>* body;
};

constexpr unsigned char kCanary = 0xa5;

void run_block(const Launch& launch, unsigned linear, Stacks& stacks) {
  const int threads = static_cast<int>(launch.block.x * launch.block.y * launch.block.z);
  Block b;
  b.name = launch.name;
  b.index = dim3(linear % launch.grid.x, linear / launch.grid.x % launch.grid.y,
                 linear / (launch.grid.x * launch.grid.y));
  b.threads = threads;
  b.body = launch.body;
  b.warps.resize(static_cast<size_t>((threads + 31) / 32));
  b.rng.seed(g_config.seed * 0x9e3779b97f4a7c15ull + g_launches.load() * 1000003ull + linear);
  blockIdx = b.index;
  blockDim = launch.block;
  gridDim = launch.grid;
  t_block = &b;

  unsigned char* dynamic = nullptr;
  if (launch.shared != nullptr) {  // NaN everywhere the block may read, a canary after it
    dynamic = static_cast<unsigned char*>(launch.shared->base());
    std::memset(dynamic, 0xff, launch.dynamic_bytes);
    std::memset(dynamic + launch.dynamic_bytes, kCanary, launch.shared->capacity - launch.dynamic_bytes);
  }

  stacks.reserve(threads, g_config.stack_bytes);
  std::vector<Fiber> fibers(static_cast<size_t>(threads));
  b.fibers = &fibers;
#if CUDAEMU_TSAN
  b.scheduler_tsan = __tsan_get_current_fiber();
#endif
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[static_cast<size_t>(t)];
    f.tid = t;
    f.stack = stacks.memory + stacks.each * static_cast<size_t>(t);
#if defined(__x86_64__)
    auto** sp = reinterpret_cast<void**>(f.stack + stacks.each);  // 16-byte aligned top
    *--sp = nullptr;                                               // fiber_entry's (never used) return address
    *--sp = reinterpret_cast<void*>(&fiber_entry);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12-r15
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = stacks.each;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
#if CUDAEMU_TSAN
    f.tsan = __tsan_create_fiber(0);
#endif
  }

  std::vector<int> order(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) order[static_cast<size_t>(t)] = t;
  if (g_config.order == 1) std::reverse(order.begin(), order.end());
  int idle_rounds = 0;
  while (b.done < threads) {
    if (g_config.order == 2) std::shuffle(order.begin(), order.end(), b.rng);
    bool ran = false, progressed = false;
    for (int t : order) {
      Fiber* f = &fibers[static_cast<size_t>(t)];
      if (f->state == State::Sleep) f->state = State::Ready;
      if (f->state != State::Ready) continue;
      to_fiber(&b, f);
      ran = true;
      switch (f->state) {
        case State::Barrier:
          progressed = true;
          arrive_barrier(&b, f);
          break;
        case State::Warp:
          progressed = true;
          arrive_warp(&b, f);
          break;
        case State::Done:
          progressed = true;
          on_exit(&b, f);
          break;
        case State::Sleep:
          break;
        case State::Ready:
          fail(&b, "internal error: fiber %d returned without a request", t);
      }
    }
    if (!ran) report_deadlock(&b);
    // Everyone spins (waits for another block): let the other blocks run; back off to short sleeps so that a long
    // wait (or a deadlock, until the watchdog) does not burn a core.
    idle_rounds = progressed ? 0 : idle_rounds + 1;
    if (idle_rounds > 0 && idle_rounds <= 16) std::this_thread::yield();
    if (idle_rounds > 16) std::this_thread::sleep_for(std::chrono::microseconds(std::min(1000, 10 * (idle_rounds - 16))));
  }

#if CUDAEMU_TSAN
  for (Fiber& f : fibers) __tsan_destroy_fiber(f.tsan);
#endif
  if (dynamic != nullptr) {
    for (size_t q = launch.dynamic_bytes; q < launch.shared->capacity; ++q) {
      if (dynamic[q] != kCanary) {
        fail(&b, "wrote past its %zu bytes of dynamic shared memory (byte %zu changed)", launch.dynamic_bytes, q);
      }
    }
  }
  t_block = nullptr;
}

}  // namespace

// --- device-side entry points --------------------------------------------------------------------------------------

namespace {

Fiber* running(const char* what) {
  Block* b = t_block;
  if (b == nullptr || b->current == nullptr) fail(nullptr, "%s called outside an emulated kernel", what);
  return b->current;
}

#if CUDAEMU_TSAN
void* sync_object(char* objects, unsigned generation) { return objects + (generation & 1u); }
#endif

}  // namespace

int syncthreads_count(int predicate, int line, const char* file) {
  Fiber* f = running("__syncthreads");
  Block* b = t_block;
  ignore_begin();
  f->state = State::Barrier;
  f->line = line;
  f->file = file;
  f->value = static_cast<uint32_t>(predicate);
  f->sync_generation = b->barrier_generation;
  ignore_end();
#if CUDAEMU_TSAN
  __tsan_release(sync_object(b->barrier_sync, f->sync_generation));
#endif
  to_scheduler(b, f, false);
#if CUDAEMU_TSAN
  __tsan_acquire(sync_object(b->barrier_sync, f->sync_generation));
#endif
  ignore_begin();
  const int result = static_cast<int>(f->result);
  ignore_end();
  return result;
}

void syncthreads(int line, const char* file) { (void)syncthreads_count(0, line, file); }

namespace {

// Blocks the running fiber at a warp collective (the request is filled in by `fill`, under the TSan ignore) until
// its warp completes it; returns the lane's result. `orders_memory`: the collective is a release/acquire between the
// lanes for ThreadSanitizer.
template <class Fill>
uint32_t wait_warp(const char* what, bool orders_memory, Fill&& fill) {
  Fiber* f = running(what);
  Block* b = t_block;
  ignore_begin();
  Warp& w = b->warps[static_cast<size_t>(f->tid / 32)];
  f->state = State::Warp;
  fill(*f);
  f->sync_generation = w.generation;
  ignore_end();
#if CUDAEMU_TSAN
  if (orders_memory) __tsan_release(sync_object(w.sync, f->sync_generation));
#endif
  to_scheduler(b, f, false);
#if CUDAEMU_TSAN
  if (orders_memory) __tsan_acquire(sync_object(w.sync, f->sync_generation));
#else
  (void)orders_memory;
#endif
  ignore_begin();
  const uint32_t result = f->result;
  ignore_end();
  return result;
}

}  // namespace

uint32_t warp_collective(int kind, unsigned mask, uint32_t value, int arg, int line, const char* file) {
  return wait_warp("a warp collective", true, [&](Fiber& f) {
    f.kind = kind;
    f.name = kCollective[kind];
    f.mask = mask;
    f.value = value;
    f.arg = arg;
    f.nargs = 0;
    f.line = line;
    f.file = file;
  });
}

void warp_uniform(const char* name, unsigned mask, int count, const uint64_t* args, const char* const* labels,
                  bool orders_memory, int line, const char* file) {
  if (count < 0 || count > kMaxUniformArgs) fail(t_block, "internal error: %s with %d uniform arguments", name, count);
  (void)wait_warp(name, orders_memory, [&](Fiber& f) {
    f.kind = kUniform;
    f.name = name;
    f.mask = mask;
    f.value = 1;
    f.arg = 0;
    f.nargs = count;
    for (int a = 0; a < count; ++a) f.args[a] = args[a];
    f.labels = labels;
    f.line = line;
    f.file = file;
  });
}

void kernel_error(int line, const char* file, const char* format, ...) {
  char message[1536];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof message, format, args);
  va_end(args);
  Block* b = t_block;
  if (b == nullptr || b->current == nullptr) {
    fail(nullptr, "%s:%d: %s (outside an emulated kernel)", base_name(file), line, message);
  }
  const int tid = b->current->tid;
  fail(b, "thread %d (lane %d of warp %d), %s:%d: %s", tid, tid % 32, tid / 32, base_name(file), line, message);
}

void nanosleep_yield() {
  Fiber* f = running("__nanosleep");
  ignore_begin();
  f->state = State::Sleep;
  ignore_end();
  to_scheduler(t_block, f, false);
}

// --- launches ----------------------------------------------------------------------------------------------------

void configure(int order, uint64_t seed, double timeout_s, int workers) {
  g_config.order = order;
  g_config.seed = seed;
  g_config.timeout_s = timeout_s;
  g_config.workers = std::max(1, workers);
}

void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_bytes, const DynamicShared* shared,
            bool cooperative, int max_coresident, const std::function<void()>& body) {
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) fail(nullptr, "kernel %s: %u threads per block", name, threads);
  if (dynamic_bytes > 0 && shared == nullptr) fail(nullptr, "kernel %s: dynamic shared memory without an array", name);
  if (shared != nullptr && dynamic_bytes + 256 > shared->capacity) {
    fail(nullptr, "kernel %s: %zu bytes of dynamic shared memory exceed the emulated capacity", name, dynamic_bytes);
  }
  if (cooperative && blocks > static_cast<uint64_t>(max_coresident)) {
    fail(nullptr, "kernel %s: cooperative launch of %llu blocks, only %d can be co-resident", name,
         static_cast<unsigned long long>(blocks), max_coresident);
  }
  if (blocks == 0) return;
  ++g_launches;
  const Launch l{name, grid, block, dynamic_bytes, shared, &body};

  // Block order: the schedule applies to the order in which a plain launch's workers take blocks, too.
  std::vector<unsigned> order(blocks);
  for (unsigned q = 0; q < blocks; ++q) order[q] = q;
  if (g_config.order == 1) std::reverse(order.begin(), order.end());
  if (g_config.order == 2) {
    std::mt19937_64 rng(g_config.seed + g_launches.load());
    std::shuffle(order.begin(), order.end(), rng);
  }

  const unsigned workers =
      cooperative ? static_cast<unsigned>(blocks) : std::min<unsigned>(static_cast<unsigned>(blocks), g_config.workers);
  std::atomic<unsigned> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  unsigned running_workers = workers;
  std::vector<std::thread> pool;
  pool.reserve(workers);
  for (unsigned w = 0; w < workers; ++w) {
    pool.emplace_back([&] {
      ignore_begin();  // the scheduler only touches the emulator's own state
      Stacks stacks;
      for (unsigned q; (q = next.fetch_add(1)) < blocks;) run_block(l, order[q], stacks);
      ignore_end();
      std::lock_guard<std::mutex> lock(mutex);
      if (--running_workers == 0) finished.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mutex);
    const auto limit = std::chrono::duration<double>(g_config.timeout_s);
    if (!finished.wait_for(lock, limit, [&] { return running_workers == 0; })) {
      std::fprintf(stderr,
                   "cudaemu: kernel %s did not finish within %.0f s (deadlock, or blocks waiting for each other that "
                   "are not co-resident)\n",
                   name, g_config.timeout_s);
      std::fflush(stderr);
      std::_Exit(87);
    }
  }
  for (std::thread& t : pool) t.join();
}

}  // namespace cudaemu
