// slvit_fast._C_emu: torch ops running the CUDA kernels under the SIMT emulator on CPU tensors.
//   slvit_fast::emu_exit_forward(x, extra, params, cfg, eps) -> Tensor   (the 2-launch forward)
//   slvit_fast::emu_exit_backward(grad_out, x, extra, params, cfg, eps, need_dx) -> Tensor[]  (1 launch)
//   slvit_fast::emu_selftest_reverse(inp, threads, with_sync) -> Tensor  (emulator self-tests)
//   slvit_fast::emu_selftest_warpsum(inp) -> Tensor
#include <Python.h>
#include <torch/library.h>

#include "exit_glue.h"

namespace {

using at::Tensor;

Tensor emu_exit_forward(const Tensor& x, const c10::optional<Tensor>& extra, at::TensorList params,
                        at::IntArrayRef cfg, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "slvit_fast emu op: x must be a CPU tensor");
  std::vector<Tensor> keep;
  slvit::ExitArgs a = slvit_glue::make_args(x, extra, params, cfg, eps, keep, "slvit_fast emu_exit_forward");
  // NaN-filled outputs and workspace: a kernel that leaves an element unwritten cannot pass a test
  Tensor ws = at::full({(int64_t)a.B * slvit::workspace_floats_per_sample(a.T, a.d, a.A, a.M)}, NAN,
                       x.options().dtype(at::kFloat));
  Tensor out = at::full({a.B, a.O}, NAN, x.options().memory_format(at::MemoryFormat::Contiguous));
  a.ws = ws.data_ptr<float>();
  a.ws_stride = slvit::workspace_floats_per_sample(a.T, a.d, a.A, a.M);
  a.out = out.data_ptr();
  const char* err;
  try {
    err = slvit::launch_exit_forward(a, nullptr);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "slvit_fast emu_exit_forward: ", e.what());
  }
  TORCH_CHECK(err == nullptr, "slvit_fast emu_exit_forward: ", err ? err : "");
  return out;
}

std::vector<Tensor> emu_exit_backward(const Tensor& grad_out, const Tensor& x, const c10::optional<Tensor>& extra,
                                      at::TensorList params, at::IntArrayRef cfg, double eps, bool need_dx) {
  TORCH_CHECK(x.device().is_cpu(), "slvit_fast emu op: x must be a CPU tensor");
  auto make_buffer = [&](int64_t n) { return at::full({n}, NAN, x.options().dtype(at::kFloat)); };
  auto launch = [](const slvit::BackwardArgs& ba) -> const char* {
    try {
      return slvit::launch_exit_backward(ba, nullptr);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "slvit_fast emu_exit_backward: ", e.what());
    }
    return nullptr;
  };
  return slvit_glue::run_backward(grad_out, x, extra, params, cfg, eps, need_dx, "slvit_fast emu_exit_backward",
                                  make_buffer, launch);
}

Tensor emu_selftest_reverse(const Tensor& inp, int64_t threads, bool with_sync) {
  TORCH_CHECK(inp.dim() == 1 && inp.scalar_type() == at::kFloat && inp.device().is_cpu(), "1-D float CPU tensor");
  Tensor in = inp.contiguous();
  Tensor out = at::full_like(in, NAN);
  try {
    const char* err = slvit::launch_selftest_reverse(in.data_ptr<float>(), out.data_ptr<float>(), (int)in.numel(),
                                                     (int)threads, with_sync, nullptr);
    TORCH_CHECK(err == nullptr, err ? err : "");
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "slvit_fast emu_selftest_reverse: ", e.what());
  }
  return out;
}

Tensor emu_selftest_warpsum(const Tensor& inp) {
  TORCH_CHECK(inp.dim() == 1 && inp.scalar_type() == at::kFloat && inp.device().is_cpu(), "1-D float CPU tensor");
  Tensor in = inp.contiguous();
  Tensor out = at::full({(in.numel() + 31) / 32}, NAN, in.options());
  const char* err = slvit::launch_selftest_warpsum(in.data_ptr<float>(), out.data_ptr<float>(), (int)in.numel(), nullptr);
  TORCH_CHECK(err == nullptr, err ? err : "");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slvit_fast, m) {
  m.def("emu_exit_forward(Tensor x, Tensor? extra, Tensor[] params, int[] cfg, float eps) -> Tensor");
  m.def("emu_exit_backward(Tensor grad_out, Tensor x, Tensor? extra, Tensor[] params, int[] cfg, float eps, "
        "bool need_dx) -> Tensor[]");
  m.def("emu_selftest_reverse(Tensor inp, int threads, bool with_sync) -> Tensor");
  m.def("emu_selftest_warpsum(Tensor inp) -> Tensor");
}

TORCH_LIBRARY_IMPL(slvit_fast, CPU, m) {
  m.impl("emu_exit_forward", &emu_exit_forward);
  m.impl("emu_exit_backward", &emu_exit_backward);
  m.impl("emu_selftest_reverse", &emu_selftest_reverse);
  m.impl("emu_selftest_warpsum", &emu_selftest_warpsum);
}

static struct PyModuleDef emu_module = {PyModuleDef_HEAD_INIT, "_C_emu",
                                        "slvit_fast CUDA kernels under the SIMT emulator", -1, nullptr};
PyMODINIT_FUNC PyInit__C_emu(void) { return PyModule_Create(&emu_module); }
