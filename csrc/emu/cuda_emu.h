// A CPU emulator for the CUDA kernels of csrc/cuda, so that CI (no GPU) runs the very same kernel source
// against the reference ops. common.cuh includes this header instead of the CUDA headers when
// EMMA_CUDA_EMULATION is defined; the .cu files are then compiled by the host C++ compiler (csrc/emu/*.cpp
// include them) into a separate test extension (emma_mamba/ops/cuda_emulator.py builds and loads it).
//
// What is emulated. Every CUDA thread of a block is a fiber (ucontext) on one OS thread; a fiber runs until
// it reaches a synchronisation point (__syncthreads, __syncwarp or a warp shuffle), then the next runnable
// fiber runs. When every live thread of a warp waits at a warp-level point, the warp is released (a shuffle
// reads the values its lanes deposited); when every live thread of the block waits at __syncthreads, the
// block is released. Blocks run one after another, so `__shared__` memory is one buffer: dynamic shared
// memory (allocated at its exact size per launch, so AddressSanitizer sees an overrun) and the static
// `__shared__` arrays are filled with NaN bytes at every block start (an uninitialised read, or a read of what
// an earlier block left, shows up in the outputs).
//
// What it checks. Between two __syncthreads each warp in turn runs as far as it can (the most skewed
// interleaving of warps); the order of the warps, of the lanes within a warp and of the blocks is a setting
// (forward, reverse or seeded random; a random schedule draws a new order at every launch, so float atomics
// add in another order each time, as on a GPU): a kernel whose result depends on it has a race that a GPU may or
// may not show. Undefined behaviour that would hang or corrupt on a GPU is an error with
// the warp, the lanes and the source lines involved: a full-mask shuffle or __syncwarp while a lane of the
// warp has exited, lanes of one warp at different kinds of synchronisation point, lanes at different
// shuffles, a block that can no longer make progress, a mask other than the full warp.
//
// What it does not show: speed, memory-model effects finer than the synchronisation points, out-of-bounds
// accesses that do not change an output, and fast-math rounding (the host's libm is used).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/core/Device.h>

// ---------------------------------------------------------------------------------------------------------
// CUDA language surface

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// static __shared__ arrays: one per kernel instance (blocks run one at a time), all in one section of the
// emulator's library that is filled with NaN bytes at every block start, as dynamic shared memory is
#define __shared__ static __attribute__((section("emma_emu_smem")))
extern "C" unsigned char __start_emma_emu_smem[] __attribute__((weak));  // the linker's bounds of that section
extern "C" unsigned char __stop_emma_emu_smem[] __attribute__((weak));

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline float __expf(float x) { return std::exp(x); }

// the host side of the runtime that the kernels' launchers touch
using cudaError_t = int;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F> inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, size_t) { return 0; }
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
namespace emma_emu {
struct Stream {};  // a type of its own: a launch whose arguments shifted does not compile
}  // namespace emma_emu
namespace at { namespace cuda { inline emma_emu::Stream getCurrentCUDAStream() { return {}; } } }
namespace c10 { namespace cuda {
struct CUDAGuard { explicit CUDAGuard(c10::Device) {} };
} }

namespace emma_emu {

// ---------------------------------------------------------------------------------------------------------
// scheduler

enum class Order { Forward = 0, Reverse = 1, Random = 2 };

struct Settings {
  Order order = Order::Forward;
  uint64_t seed = 0;
  size_t stack_bytes = 256 * 1024;
  uint64_t launches = 0;  // since the schedule was set: a random schedule's order differs launch to launch
};
inline Settings& settings() { static Settings s; return s; }

enum class State { Run, AtWarp, AtBlock, Done };
enum class WarpOp { Sync = 0, Shuffle = 1 };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  State state = State::Run;
  WarpOp op = WarpOp::Sync;
  int line = 0;
  uint64_t shuffles = 0;  // shuffles this lane has done (lanes of a warp must agree)
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  std::vector<unsigned char> smem;
  std::vector<uint64_t> slots;  // per warp: 2 x 32 shuffle slots (double-buffered by shuffle parity)
  ucontext_t main;
  std::function<void()> body;
  std::string error;  // an emulator check that failed inside a fiber
  int current = -1;
  int nthreads = 0;
};

// The thread/block coordinates the running fiber sees (the scheduler sets them at every switch).
inline dim3 g_threadIdx, g_blockIdx, g_blockDim, g_gridDim;
inline Block* g_block = nullptr;

[[noreturn]] inline void fail(const std::string& msg) {
  throw std::runtime_error("emma_mamba CUDA emulator: " + msg);
}

inline void fiber_main() {
  Block* b = g_block;
  try {
    b->body();
  } catch (const std::exception& e) {  // never unwind through the fiber's entry frame
    if (b->error.empty()) b->error = e.what();
  }
  b->fibers[b->current].state = State::Done;
  // returning resumes uc_link (the scheduler)
}

inline void yield_to_scheduler() {
  Block* b = g_block;
  Fiber& f = b->fibers[b->current];
  swapcontext(&f.ctx, &b->main);
}

// "0-2,4-31"
inline std::string lanes_text(const std::vector<int>& lanes) {
  std::string s;
  for (size_t i = 0; i < lanes.size();) {
    size_t j = i;
    while (j + 1 < lanes.size() && lanes[j + 1] == lanes[j] + 1) ++j;
    s += (s.empty() ? "" : ",") + std::to_string(lanes[i]) + (j > i ? "-" + std::to_string(lanes[j]) : "");
    i = j + 1;
  }
  return s;
}

// Releases warp `w` if every lane waits at a warp-level point (checking that they wait at the same kind of
// point, that none has exited and that none waits at __syncthreads instead). Returns whether it released.
inline bool release_warp(Block& b, int w) {
  const int lo = 32 * w, hi = std::min(b.nthreads, lo + 32);
  std::vector<int> at_warp, at_block, done;
  for (int i = lo; i < hi; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.state == State::AtWarp) at_warp.push_back(i - lo);
    else if (f.state == State::AtBlock) at_block.push_back(i - lo);
    else if (f.state == State::Done) done.push_back(i - lo);
    else return false;  // a lane still running
  }
  if (at_warp.empty()) return false;
  const Fiber& first = b.fibers[lo + at_warp[0]];
  const std::string where = std::string(first.op == WarpOp::Shuffle ? "a shuffle" : "__syncwarp") + " (line " +
                            std::to_string(first.line) + ")";
  const std::string warp = "warp " + std::to_string(w) + ": ";
  if (hi - lo != 32)
    fail(warp + "has " + std::to_string(hi - lo) + " threads (block size not a multiple of 32) and reaches " +
         where + " with the full mask");
  if (!done.empty())
    fail(warp + "lanes " + lanes_text(at_warp) + " wait at " + where + " with the full mask, but lanes " +
         lanes_text(done) + " have exited (undefined behaviour on a GPU)");
  if (!at_block.empty())
    fail(warp + "lanes " + lanes_text(at_warp) + " wait at " + where + " while lanes " + lanes_text(at_block) +
         " wait at __syncthreads (line " + std::to_string(b.fibers[lo + at_block[0]].line) + ")");
  for (int i = lo; i < hi; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.op != first.op || (f.op == WarpOp::Shuffle && f.shuffles != first.shuffles))
      fail(warp + "lane " + std::to_string(i - lo) + " is at " +
           (f.op == WarpOp::Shuffle ? "a shuffle" : "__syncwarp") + " (line " + std::to_string(f.line) +
           ") while lane " + std::to_string(at_warp[0]) + " is at " + where);
  }
  for (int i = lo; i < hi; ++i) b.fibers[i].state = State::Run;
  return true;
}

// Releases __syncthreads once every live thread waits there.
inline bool release_block(Block& b) {
  bool any = false;
  for (const auto& f : b.fibers) {
    if (f.state == State::Run || f.state == State::AtWarp) return false;
    any = any || f.state == State::AtBlock;
  }
  for (auto& f : b.fibers)
    if (f.state == State::AtBlock) f.state = State::Run;
  return any;
}

// Runs one block. Between two __syncthreads the warps are independent, so each warp in turn runs as far as
// it can (through its own shuffles) before the next: the order of warps (and of lanes within a warp) is the
// schedule, and warp-at-a-time is the most skewed interleaving, the one that exposes a missing barrier.
inline void run_block(Block& b, std::mt19937_64& rng) {
  const int n = b.nthreads, nwarps = (n + 31) / 32;
  const size_t ss = settings().stack_bytes;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f = Fiber{};
    f.tid = dim3(i % g_blockDim.x, (i / g_blockDim.x) % g_blockDim.y, i / (g_blockDim.x * g_blockDim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks.data() + static_cast<size_t>(i) * ss;
    f.ctx.uc_stack.ss_size = ss;
    f.ctx.uc_link = &b.main;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::fill(b.smem.begin(), b.smem.end(), static_cast<unsigned char>(0xff));  // NaN floats
  if (__start_emma_emu_smem != nullptr && __stop_emma_emu_smem != nullptr)
    std::fill(__start_emma_emu_smem, __stop_emma_emu_smem, static_cast<unsigned char>(0xff));
  const Order order = settings().order;
  auto arrange = [&](std::vector<int>& v) {
    if (order == Order::Reverse) std::reverse(v.begin(), v.end());
    else if (order == Order::Random) std::shuffle(v.begin(), v.end(), rng);
  };
  std::vector<int> warps(nwarps), lanes;
  for (;;) {
    for (int w = 0; w < nwarps; ++w) warps[w] = w;
    arrange(warps);
    for (int w : warps) {
      const int lo = 32 * w, hi = std::min(n, lo + 32);
      do {
        lanes.clear();
        for (int i = lo; i < hi; ++i) lanes.push_back(i);
        arrange(lanes);
        for (int i : lanes) {
          if (b.fibers[i].state != State::Run) continue;
          b.current = i;
          g_threadIdx = b.fibers[i].tid;
          swapcontext(&b.main, &b.fibers[i].ctx);
          if (!b.error.empty()) throw std::runtime_error(b.error);
        }
      } while (release_warp(b, w));
    }
    bool all_done = true;
    for (const auto& f : b.fibers) all_done = all_done && f.state == State::Done;
    if (all_done) return;
    if (!release_block(b)) fail("block deadlocked: no warp or block barrier can be released");
  }
}

template <typename T> inline T* dynamic_smem() { return reinterpret_cast<T*>(g_block->smem.data()); }

inline std::mutex& launch_mutex() { static std::mutex m; return m; }

// kernel<<<grid, block, smem>>>(args...): every block of the grid, one after another (in random order under
// Order::Random), each thread a fiber.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Stream, Args&&... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) fail("block of " + std::to_string(n) + " threads (1..1024 allowed)");
  if (smem_bytes > 227 * 1024) fail("dynamic shared memory of " + std::to_string(smem_bytes) + " bytes");
  std::tuple<std::decay_t<KArgs>...> kargs(std::forward<Args>(args)...);  // by value, as a launch copies them
  static Block block_state;  // reused by every launch (under the mutex): fiber stacks are allocated once
  Block* b = &block_state;
  b->nthreads = n;
  b->error.clear();
  b->fibers.resize(n);
  const size_t stack_total = static_cast<size_t>(n) * settings().stack_bytes;
  if (b->stacks.size() < stack_total) b->stacks.resize(stack_total);
  b->smem = std::vector<unsigned char>(smem_bytes);  // its exact size: an overrun is AddressSanitizer's to see
  b->slots.assign(static_cast<size_t>((n + 31) / 32) * 64, 0);
  b->body = [&] { std::apply(kernel, kargs); };
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  std::mt19937_64 rng(settings().seed * 0x9E3779B97F4A7C15ull + settings().launches++);
  if (settings().order == Order::Random) std::shuffle(blocks.begin(), blocks.end(), rng);
  else if (settings().order == Order::Reverse) std::reverse(blocks.begin(), blocks.end());
  g_block = b;
  g_blockDim = block;
  g_gridDim = grid;
  try {
    for (const dim3& bi : blocks) {
      g_blockIdx = bi;
      run_block(*b, rng);
    }
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// warp and block synchronisation

inline void check_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask is not emulated");
}

inline void syncthreads(int line) {
  Fiber& f = g_block->fibers[g_block->current];
  f.state = State::AtBlock;
  f.line = line;
  yield_to_scheduler();
}

inline void syncwarp(unsigned mask, int line) {
  check_mask(mask, "__syncwarp");
  Fiber& f = g_block->fibers[g_block->current];
  f.state = State::AtWarp;
  f.op = WarpOp::Sync;
  f.line = line;
  yield_to_scheduler();
}

enum class Shfl { Idx, Up, Down, Xor };

template <typename T>
T shuffle(unsigned mask, T v, int arg, int width, Shfl kind, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of this type");
  check_mask(mask, "a shuffle");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width " + std::to_string(width));
  Block* b = g_block;
  const int me = b->current;
  const int warp = me / 32, lane = me % 32;
  uint64_t* slots = b->slots.data() + static_cast<size_t>(warp) * 64 + (b->fibers[me].shuffles & 1) * 32;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  slots[lane] = raw;
  Fiber& f = b->fibers[me];
  f.state = State::AtWarp;
  f.op = WarpOp::Shuffle;
  f.line = line;
  yield_to_scheduler();
  const int base = lane & ~(width - 1), sub = lane - base;
  int src = lane;
  switch (kind) {
    case Shfl::Idx: src = base + ((arg % width) + width) % width; break;
    case Shfl::Up: src = sub - arg >= 0 ? lane - arg : lane; break;
    case Shfl::Down: src = sub + arg < width ? lane + arg : lane; break;
    case Shfl::Xor: src = (lane ^ arg) < base + width ? lane ^ arg : lane; break;  // earlier groups allowed
  }
  b->fibers[me].shuffles += 1;
  T out;
  std::memcpy(&out, &slots[src], sizeof(T));
  return out;
}

}  // namespace emma_emu

#define threadIdx (::emma_emu::g_threadIdx)
#define blockIdx (::emma_emu::g_blockIdx)
#define blockDim (::emma_emu::g_blockDim)
#define gridDim (::emma_emu::g_gridDim)

#define __syncthreads() ::emma_emu::syncthreads(__LINE__)
#define __syncwarp(...) ::emma_emu::syncwarp(::emma_emu::warp_mask(__VA_ARGS__), __LINE__)
#define __shfl_sync(mask, v, src, ...) \
  ::emma_emu::shuffle(mask, v, src, ::emma_emu::width_or_32(__VA_ARGS__), ::emma_emu::Shfl::Idx, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::emma_emu::shuffle(mask, v, d, ::emma_emu::width_or_32(__VA_ARGS__), ::emma_emu::Shfl::Up, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::emma_emu::shuffle(mask, v, d, ::emma_emu::width_or_32(__VA_ARGS__), ::emma_emu::Shfl::Down, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::emma_emu::shuffle(mask, v, m, ::emma_emu::width_or_32(__VA_ARGS__), ::emma_emu::Shfl::Xor, __LINE__)

namespace emma_emu {
inline unsigned warp_mask() { return 0xffffffffu; }
inline unsigned warp_mask(unsigned m) { return m; }
inline int width_or_32() { return 32; }
inline int width_or_32(int w) { return w; }

inline float atomic_add(float* p, float v) { const float old = *p; *p = old + v; return old; }
}  // namespace emma_emu

inline float atomicAdd(float* p, float v) { return ::emma_emu::atomic_add(p, v); }

// device integer min/max of mixed types, as CUDA's overloads allow
namespace emma { namespace cuda {
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
} }

#define EMMA_DEVICE_TENSOR(t) ((t).is_cpu())
#define EMMA_DYNAMIC_SMEM(T, name) T* name = ::emma_emu::dynamic_smem<T>()
// each argument parenthesised, so that one split by a template-id's comma (which nvcc's <<<>>> would reject)
// is a compile error here too
#define EMMA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emma_emu::launch((kernel), (grid), (block), (smem), (stream), __VA_ARGS__)
