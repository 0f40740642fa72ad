// slvit_fast._C_cuda: torch op running the CUDA kernels on CUDA tensors.
//   slvit_fast::cuda_exit_forward(x, extra, params, cfg, eps) -> Tensor   (2 kernel launches)
//   slvit_fast::cuda_exit_backward(grad_out, x, extra, params, cfg, eps, need_dx) -> Tensor[]  (1 launch)
//   slvit_fast::cuda_compiled_archs() -> str                                (e.g. "800,900")
#include <Python.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "exit_glue.h"

namespace {

using at::Tensor;

Tensor cuda_exit_forward(const Tensor& x, const c10::optional<Tensor>& extra, at::TensorList params,
                         at::IntArrayRef cfg, double eps) {
  TORCH_CHECK(x.is_cuda(), "slvit_fast cuda op: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<Tensor> keep;
  slvit::ExitArgs a = slvit_glue::make_args(x, extra, params, cfg, eps, keep, "slvit_fast cuda_exit_forward");
  const int64_t per = slvit::workspace_floats_per_sample(a.T, a.d, a.A, a.M);
  Tensor ws = at::empty({(int64_t)a.B * per}, x.options().dtype(at::kFloat));
  Tensor out = at::empty({a.B, a.O}, x.options().memory_format(at::MemoryFormat::Contiguous));
  a.ws = ws.data_ptr<float>();
  a.ws_stride = per;
  a.out = out.data_ptr();
  const char* err = slvit::launch_exit_forward(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "slvit_fast cuda_exit_forward: kernel launch failed: ", err ? err : "");
  return out;
}

std::vector<Tensor> cuda_exit_backward(const Tensor& grad_out, const Tensor& x, const c10::optional<Tensor>& extra,
                                       at::TensorList params, at::IntArrayRef cfg, double eps, bool need_dx) {
  TORCH_CHECK(x.is_cuda(), "slvit_fast cuda op: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  auto make_buffer = [&](int64_t n) { return at::empty({n}, x.options().dtype(at::kFloat)); };
  auto launch = [](const slvit::BackwardArgs& ba) -> const char* {
    return slvit::launch_exit_backward(ba, c10::cuda::getCurrentCUDAStream().stream());
  };
  return slvit_glue::run_backward(grad_out, x, extra, params, cfg, eps, need_dx, "slvit_fast cuda_exit_backward",
                                  make_buffer, launch);
}

}  // namespace

namespace slvit { const char* compiled_archs(); }

TORCH_LIBRARY_FRAGMENT(slvit_fast, m) {
  m.def("cuda_exit_forward(Tensor x, Tensor? extra, Tensor[] params, int[] cfg, float eps) -> Tensor");
  m.def("cuda_exit_backward(Tensor grad_out, Tensor x, Tensor? extra, Tensor[] params, int[] cfg, float eps, "
        "bool need_dx) -> Tensor[]");
  m.def("cuda_compiled_archs() -> str", []() -> std::string { return slvit::compiled_archs(); });
}

TORCH_LIBRARY_IMPL(slvit_fast, CUDA, m) {
  m.impl("cuda_exit_forward", &cuda_exit_forward);
  m.impl("cuda_exit_backward", &cuda_exit_backward);
}

static struct PyModuleDef cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "slvit_fast CUDA kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&cuda_module); }
