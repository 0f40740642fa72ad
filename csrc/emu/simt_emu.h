// SIMT emulation: compile unmodified CUDA kernel sources as host C++ and run them on the CPU.
//
// Included *instead of* the CUDA runtime when SLVIT_EMULATE is defined (csrc/emu/kernels_emu.cpp).
// Model:
//  - blocks of a launch run one after another (so `__shared__` is a function-local `static`, i.e.
//    one storage per kernel instantiation, which is per-block storage when blocks run in turn);
//  - a block's threads are host execution contexts with their own stacks (ucontext fibers of the
//    host thread running the launch), scheduled *one at a time, deterministically*: a thread runs
//    until it reaches a barrier (`__syncthreads`, `__syncwarp`, a warp shuffle) or returns, then
//    hands over to the next runnable thread of the block (lowest index first after a barrier
//    completes). Barriers count only live threads: a thread that returns early drops out of the
//    block barrier and of its warp's barrier (like std::barrier::arrive_and_drop). Fibers instead of
//    OS threads: a barrier costs ~1 us instead of a futex round trip per thread (~20x faster here),
//    and the interleaving is reproducible.
//    Because threads do not run concurrently, a missing `__syncthreads` is not a flaky race here but
//    a deterministic wrong answer: a thread reads shared data its peers have not written yet (the
//    dynamic shared memory is poisoned with NaN before each block).
//  - warp shuffles: write to a 32-slot per-warp buffer, warp barrier, read, warp barrier;
//  - barrier divergence (some threads at `__syncthreads`, others waiting for a warp barrier that can
//    never complete) is reported as an error instead of hanging;
//  - warp-level MMA (`mma.sync` m16n8k16 f16/bf16 and m16n8k8 tf32, fp32 accumulate): every lane
//    deposits its A/B fragment registers in a per-warp buffer, warp barrier, each lane rebuilds the
//    whole A and B tiles with the PTX ISA fragment layouts (9.7.14.5.7/8: groupID = laneid >> 2,
//    threadID_in_group = laneid % 4) and computes its own C/D elements, warp barrier. The layouts
//    are written here independently of the kernels' loaders, so a kernel that packs a fragment
//    wrongly gets a wrong product. SLVIT_EMU_PLANT_MMA_BUG swaps two A fragment registers (a test
//    builds with it and must see the GEMMs fail);
//  - launches go through emu::launch (the SLVIT_LAUNCH macro), which checks the launch configuration
//    like the driver would (block size, grid size, dynamic shared memory limits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <ucontext.h>

#include <atomic>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

// CUDA's headers define these for host compilers; the emulator gives them host meanings.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

namespace emu {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // H100 opt-in limit per block

struct Abort {};  // unwinds a CUDA thread's kernel call after a detected error

enum State : uint8_t { RUN, WAIT_BLOCK, WAIT_WARP, DONE };

inline thread_local uint3 tl_threadIdx;
inline thread_local uint3 tl_blockIdx;
inline dim3 g_blockDim, g_gridDim;

struct Block;
inline thread_local Block* tl_block = nullptr;

// One block: its CUDA threads are fibers (ucontext) of the host thread running the launch, switched
// only at barriers, in a fixed order - so every run of a kernel is the same interleaving.
struct Block {
  int n = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  std::vector<State> state;
  std::vector<uint8_t> started;
  int alive = 0, wait_block = 0, current = -1, next_to_run = -1;
  std::vector<int> warp_alive, warp_wait;
  std::vector<std::array<uint64_t, kWarp>> shfl;
  std::vector<std::array<uint32_t, kWarp * 6>> mma_regs;  // per warp: each lane's 4 A + 2 B registers
  std::vector<unsigned char> dyn_smem;
  bool failed = false;
  std::string error;
  uint64_t switches = 0;
  std::function<void()> body;
  static constexpr size_t kStack = 256 * 1024;

  void init(int nthreads, size_t smem) {
    n = nthreads;
    if ((int)stacks.size() < n) {
      for (int i = (int)stacks.size(); i < n; ++i) stacks.emplace_back(new char[kStack]);
    }
    ctx.assign(n, ucontext_t{});
    state.assign(n, RUN);
    started.assign(n, 0);
    alive = n;
    wait_block = 0;
    int nw = (n + kWarp - 1) / kWarp;
    warp_alive.assign(nw, 0);
    for (int i = 0; i < n; ++i) warp_alive[i / kWarp]++;
    warp_wait.assign(nw, 0);
    shfl.assign(nw, {});
    mma_regs.assign(nw, {});
    dyn_smem.assign(smem, 0xFF);  // all-ones bytes: NaN floats, so reads of unwritten smem show
    failed = false;
    error.clear();
    current = next_to_run = -1;
  }

  void set_current(int j) {
    current = j;
    tl_threadIdx = uint3{(unsigned)j % g_blockDim.x, ((unsigned)j / g_blockDim.x) % g_blockDim.y,
                         (unsigned)j / (g_blockDim.x * g_blockDim.y)};
  }
  // Transfer control from fiber `me` to fiber `j` (no-op when j == me).
  void prepare(int j) {
    if (started[j]) return;
    started[j] = 1;
    getcontext(&ctx[j]);
    ctx[j].uc_stack.ss_sp = stacks[j].get();
    ctx[j].uc_stack.ss_size = kStack;
    ctx[j].uc_link = &sched;
    makecontext(&ctx[j], (void (*)())&Block::entry, 1, j);
  }
  void hand_to(int me, int j) {
    if (j != me) {
      prepare(j);
      ++switches;
      set_current(j);
      swapcontext(&ctx[me], &ctx[j]);
      // resumed: whoever switched back to us has set current = me
    }
    if (failed) throw Abort{};
  }
  int next_runnable(int from) const {
    for (int k = 1; k <= n; ++k) {
      int j = (from + k) % n;
      if (state[j] == RUN) return j;
    }
    return -1;
  }
  int lowest_runnable(int lo, int hi) const {
    for (int j = lo; j < hi; ++j)
      if (state[j] == RUN) return j;
    return -1;
  }
  void fail(const std::string& why) {
    if (!failed) {
      failed = true;
      error = why;
    }
  }
  // Release completed barriers; returns the thread that should run next, or -1.
  int release_completed(int w) {
    int pick = -1;
    if (w >= 0 && warp_wait[w] > 0 && warp_wait[w] == warp_alive[w]) {
      int lo = w * kWarp, hi = std::min(n, lo + kWarp);
      for (int j = lo; j < hi; ++j)
        if (state[j] == WAIT_WARP) state[j] = RUN;
      warp_wait[w] = 0;
      pick = lowest_runnable(lo, hi);
    }
    if (wait_block > 0 && wait_block == alive) {
      for (int j = 0; j < n; ++j)
        if (state[j] == WAIT_BLOCK) state[j] = RUN;
      wait_block = 0;
      pick = lowest_runnable(0, n);
    }
    return pick;
  }
  void wait_at(int me, State s) {
    state[me] = s;
    int w = me / kWarp;
    if (s == WAIT_BLOCK) {
      ++wait_block;
    } else {
      ++warp_wait[w];
    }
    int pick = release_completed(w);
    if (pick < 0) pick = next_runnable(me);
    if (pick < 0) {
      fail("deadlock: barrier divergence (threads wait at __syncthreads while others wait at a warp "
           "barrier, or a warp barrier waits for a lane that never arrives)");
      throw Abort{};
    }
    hand_to(me, pick);
  }
  // Fiber `me` returned from the kernel: choose who runs next (the scheduler loop switches to it).
  void finish(int me) {
    state[me] = DONE;
    --alive;
    int w = me / kWarp;
    --warp_alive[w];
    int pick = -1;
    if (failed) {
      for (int j = 0; j < n && pick < 0; ++j)
        if (state[j] != DONE) pick = j;  // let every other fiber unwind
      for (int j = 0; j < n; ++j)
        if (state[j] != DONE) state[j] = RUN;
    } else {
      pick = release_completed(w);
      if (pick < 0) pick = next_runnable(me);
      if (pick < 0 && alive > 0) {
        fail("deadlock: threads wait at a barrier that can no longer complete");
        for (int j = 0; j < n && pick < 0; ++j)
          if (state[j] != DONE) pick = j;
        for (int j = 0; j < n; ++j)
          if (state[j] != DONE) state[j] = RUN;
      }
    }
    next_to_run = pick;
  }

  static void entry(int me) {
    Block* b = tl_block;
    if (!b->failed) {
      try {
        b->body();
      } catch (Abort&) {
      } catch (std::exception& e) {
        b->fail(std::string("exception in kernel: ") + e.what());
      }
    }
    b->finish(me);
    // returning resumes uc_link (the scheduler)
  }

  void run() {
    next_to_run = 0;
    while (next_to_run >= 0) {
      int j = next_to_run;
      next_to_run = -1;
      prepare(j);
      ++switches;
      set_current(j);
      swapcontext(&sched, &ctx[j]);
    }
  }
};

inline int cur_tid() { return tl_block->current; }
inline void syncthreads() { tl_block->wait_at(cur_tid(), WAIT_BLOCK); }
inline void syncwarp() { tl_block->wait_at(cur_tid(), WAIT_WARP); }

template <class T>
inline T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  Block* b = tl_block;
  const int tid = cur_tid();
  int lane = tid % kWarp, w = tid / kWarp;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  b->shfl[w][lane] = raw;
  syncwarp();
  T r;
  uint64_t got = b->shfl[w][(src_lane < 0 || src_lane >= kWarp) ? lane : src_lane];
  std::memcpy(&r, &got, sizeof(T));
  syncwarp();
  return r;
}

// ---- warp-level MMA ------------------------------------------------------------------------------
enum class MmaKind { F16, BF16, TF32 };

// (row, col) of element i of a lane's fragment, PTX ISA "Matrix Fragments for mma.m16n8k16 / m16n8k8".
// m16n8k16 .f16/.bf16: A holds a0..a7 (register i/2, low half first), B b0..b3, C/D c0..c3.
// m16n8k8 .tf32: A a0..a3, B b0..b1 (one element per register), C/D as above.
inline void mma_frag_a(MmaKind k, int lane, int i, int& row, int& col) {
  const int g = lane >> 2, t = lane & 3;
  if (k == MmaKind::TF32) {
#ifdef SLVIT_EMU_PLANT_MMA_BUG
    if (i == 1 || i == 2) i ^= 3;  // planted: a1 and a2 swapped
#endif
    row = g + ((i & 1) ? 8 : 0);  // a0, a2: groupID; a1, a3: groupID + 8
    col = t + ((i & 2) ? 4 : 0);  // a0, a1: threadID_in_group; a2, a3: + 4
  } else {
#ifdef SLVIT_EMU_PLANT_MMA_BUG
    if ((i & 6) == 2 || (i & 6) == 4) i ^= 6;  // planted: registers 1 (a2, a3) and 2 (a4, a5) swapped
#endif
    row = g + ((i & 2) ? 8 : 0);  // a0,a1,a4,a5: groupID; a2,a3,a6,a7: groupID + 8
    col = t * 2 + (i & 1) + ((i & 4) ? 8 : 0);  // a0..a3: 2t + (i & 1); a4..a7: + 8
  }
}
inline void mma_frag_b(MmaKind k, int lane, int i, int& row, int& col) {
  const int g = lane >> 2, t = lane & 3;
  col = g;
  if (k == MmaKind::TF32)
    row = t + (i ? 4 : 0);  // b0: threadID_in_group; b1: + 4
  else
    row = t * 2 + (i & 1) + ((i & 2) ? 8 : 0);  // b0,b1: 2t + i; b2,b3: + 8
}
inline void mma_frag_c(int lane, int i, int& row, int& col) {
  row = (lane >> 2) + ((i & 2) ? 8 : 0);
  col = (lane & 3) * 2 + (i & 1);
}

inline double mma_elem(MmaKind k, uint32_t reg, int half) {
  if (k == MmaKind::TF32) {
    uint32_t bits = reg & 0xFFFFE000u;  // the tensor core reads 19 bits of a .tf32 operand
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const uint16_t raw = (uint16_t)(half ? reg >> 16 : reg & 0xFFFFu);
  if (k == MmaKind::F16) {
    __half h;
    std::memcpy(&h, &raw, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &raw, 2);
  return __bfloat162float(h);
}

// d = A * B + c for one warp (all 32 lanes must call it, like the .aligned instruction).
inline void mma_sync(MmaKind k, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  Block* blk = tl_block;
  const int tid = cur_tid(), lane = tid % kWarp, w = tid / kWarp;
  if (blk->warp_alive[w] != kWarp) {
    blk->fail("mma.sync executed by a warp with exited lanes (it needs all 32)");
    throw Abort{};
  }
  auto& regs = blk->mma_regs[w];
  for (int i = 0; i < 4; ++i) regs[lane * 6 + i] = a[i];
  for (int i = 0; i < 2; ++i) regs[lane * 6 + 4 + i] = b[i];
  syncwarp();
  const int K = k == MmaKind::TF32 ? 8 : 16;
  const int na = k == MmaKind::TF32 ? 4 : 8, nb = k == MmaKind::TF32 ? 2 : 4;
  const int per_reg = k == MmaKind::TF32 ? 1 : 2;
  double A[16][16], B[16][8];
  for (auto& r : A) std::fill(std::begin(r), std::end(r), std::nan(""));
  for (auto& r : B) std::fill(std::begin(r), std::end(r), std::nan(""));
  for (int l = 0; l < kWarp; ++l) {
    for (int i = 0; i < na; ++i) {
      int row, col;
      mma_frag_a(k, l, i, row, col);
      A[row][col] = mma_elem(k, regs[l * 6 + i / per_reg], i % per_reg);
    }
    for (int i = 0; i < nb; ++i) {
      int row, col;
      mma_frag_b(k, l, i, row, col);
      B[row][col] = mma_elem(k, regs[l * 6 + 4 + i / per_reg], i % per_reg);
    }
  }
  syncwarp();  // every lane has read the registers before any lane's next mma overwrites them
  for (int i = 0; i < 4; ++i) {
    int row, col;
    mma_frag_c(lane, i, row, col);
    double s = 0.0;  // products of 16-bit / tf32 operands are exact; fp32 accumulation
    for (int kk = 0; kk < K; ++kk) s += A[row][kk] * B[kk][col];
    d[i] = (float)((double)c[i] + s);
  }
}

// cvt.rna.tf32.f32: round to the nearest tf32 (10 mantissa bits), ties away from zero.
inline uint32_t cvt_rna_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7F800000u) != 0x7F800000u) bits += 0x1000u;  // finite: add half an ulp of tf32
  return bits & 0xFFFFE000u;
}

inline unsigned char* dynamic_smem() { return tl_block->dyn_smem.data(); }

inline std::atomic<uint64_t> g_total_switches{0};
inline std::mutex g_launch_mutex;  // one emulated launch at a time (static __shared__ is global)

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  const long long nthreads = (long long)block.x * block.y * block.z;
  if (nthreads <= 0 || nthreads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw std::runtime_error("emulated launch: invalid block size " + std::to_string(block.x) + "x" +
                             std::to_string(block.y) + "x" + std::to_string(block.z) + " (at most 1024 threads)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("emulated launch: invalid grid size");
  if (smem > kMaxDynamicSmem)
    throw std::runtime_error("emulated launch: " + std::to_string(smem) + " bytes of dynamic shared memory exceed " +
                             std::to_string(kMaxDynamicSmem));
  std::lock_guard<std::mutex> guard(g_launch_mutex);
  g_blockDim = block;
  g_gridDim = grid;
  Block blk;
  Block* saved = tl_block;
  tl_block = &blk;
  blk.body = [&]() { kernel(args...); };
  const int n = (int)nthreads;
  std::string error;
  for (unsigned bz = 0; bz < grid.z && error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && error.empty(); ++bx) {
        blk.init(n, smem);
        tl_blockIdx = uint3{bx, by, bz};
        blk.run();
        g_total_switches += blk.switches;
        blk.switches = 0;
        if (blk.failed)
          error = "emulated kernel error in block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                  std::to_string(bz) + "): " + blk.error;
      }
  tl_block = saved;
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace emu

// CUDA built-ins
#define threadIdx (::emu::tl_threadIdx)
#define blockIdx (::emu::tl_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)
#define warpSize 32

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return emu::shuffle(v, (emu::cur_tid() % 32) ^ mask);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  int lane = emu::cur_tid() % 32;
  return emu::shuffle(v, lane + (int)delta < 32 ? lane + (int)delta : lane);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
  return emu::shuffle(v, src & 31);
}
inline float atomicAdd(float* p, float v) {  // threads never run concurrently: a plain update is atomic
  float old = *p;
  *p = old + v;
  return old;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

typedef void* slvit_stream_t;
#define SLVIT_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())
#define SLVIT_LAUNCH(kernel, grid, block, smem, stream, ...) ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define SLVIT_LAUNCH_CHECK() 0
