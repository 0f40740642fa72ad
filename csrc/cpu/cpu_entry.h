// What the Python module entry point (module_cpu.cpp) needs from slvit_cpu.cpp: the fused inference
// forward with its weights validated once and kept (Prepared) while the parameters are unchanged.
#pragma once

#include <ATen/EmptyTensor.h>  // at::detail::empty_cpu: run_prepared's output without an op dispatch
#include <ATen/core/Tensor.h>

#include <memory>

namespace slvit_cpu {

struct Prepared;

// The environment switches of one fused call, read and validated together by the caller:
// SLVIT_FAST_CPU_FUSED (and CPU support), SLVIT_FAST_CPU_ISA, SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS. The
// module entry point reads them with the GIL held and passes them to entry_run, which runs with the
// GIL released: Python changes the environment (os.environ -> setenv) only under the GIL, so a
// getenv made there can never race one.
struct FusedEnv {
  bool fused = false;       // the fused kernels run (switch on, CPU supported)
  int isa = 0;              // slvit_fused::Isa of the GEMM tiles
  double min_flops = 2e6;   // smaller problems stay on the calling thread
  int64_t arena_floats = 0;  // bound of the reused per-thread workspace (SLVIT_FAST_CPU_ARENA_MB)
  bool embed_direct = true;  // SLVIT_FAST_CPU_EMBED (slvit_fused::Problem::embed_direct)
};
// Throws (naming the variable and value) on an invalid SLVIT_FAST_CPU_FUSED / SLVIT_FAST_CPU_ISA /
// SLVIT_FAST_CPU_ARENA_MB.
FusedEnv entry_env();
// Validates params for (x, extra, cfg) exactly as the op does (errors are thrown) and returns the
// weight pointers (float32 copies of non-float32 / non-contiguous parameters are kept inside).
std::shared_ptr<Prepared> entry_prepare(const at::Tensor& x, const c10::optional<at::Tensor>& extra,
                                        at::TensorList params, at::IntArrayRef cfg, double eps);
// True when x / extra have the per-sample shapes pp was prepared for (any batch size > 0).
bool entry_matches(const Prepared& pp, const at::Tensor& x, const c10::optional<at::Tensor>& extra);
// Runs with the GIL released: reads no environment variable (env comes from entry_env).
at::Tensor entry_run(const Prepared& pp, const at::Tensor& x, const c10::optional<at::Tensor>& extra,
                     const FusedEnv& env);
// Knobs of the fused path for tests / benchmarks: legacy_phases (old team phase layout) and
// per-phase cycle counting (-1 leaves a knob as it is); returns the counters collected so far.
at::Tensor fused_debug(int64_t legacy_phases, int64_t profile);

}  // namespace slvit_cpu
