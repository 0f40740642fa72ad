// What the Python module entry point (module_cpu.cpp) needs from slvit_cpu.cpp: the fused inference
// forward with its weights validated once and kept (Prepared) while the parameters are unchanged.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

namespace slvit_cpu {

struct Prepared;

// True when inference would take the fused AVX2 kernels (SLVIT_FAST_CPU_FUSED on, CPU supported).
bool entry_fused_wanted();
// Validates params for (x, extra, cfg) exactly as the op does (errors are thrown) and returns the
// weight pointers (float32 copies of non-float32 / non-contiguous parameters are kept inside).
std::shared_ptr<Prepared> entry_prepare(const at::Tensor& x, const c10::optional<at::Tensor>& extra,
                                        at::TensorList params, at::IntArrayRef cfg, double eps);
// True when x / extra have the per-sample shapes pp was prepared for (any batch size > 0).
bool entry_matches(const Prepared& pp, const at::Tensor& x, const c10::optional<at::Tensor>& extra);
at::Tensor entry_run(const Prepared& pp, const at::Tensor& x, const c10::optional<at::Tensor>& extra);
// Knobs of the fused path for tests / benchmarks: legacy_phases (old team phase layout) and
// per-phase cycle counting (-1 leaves a knob as it is); returns the counters collected so far.
at::Tensor fused_debug(int64_t legacy_phases, int64_t profile);

}  // namespace slvit_cpu
