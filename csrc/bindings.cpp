// Python bindings of the extension ``scadfast._C`` (pybind11, built by setup.py).
//
//   has_cuda() -> bool                      True when compiled with the CUDA kernels (SCADFAST_WITH_CUDA)
//   cond_aug_forward(a, eps, glu) -> (c_hat, mu, logvar, kl)
//   cond_aug_backward(a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl, glu) -> (grad_a, grad_eps)
//
// These are the raw kernels: no autograd. The PyTorch ops ``scadfast::cond_aug`` and
// ``scadfast::cond_aug_backward`` (torch.library.custom_op in scadfast/ops/conditioning.py, with fake
// impls and autograd) call them. The wrappers here validate what the kernels rely on, make the
// inputs contiguous and dispatch on the device (CPU kernel, or CUDA kernel when built with CUDA).

#include <torch/extension.h>

#include "cond_aug.h"

namespace {

bool has_cuda() {
#ifdef SCADFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "scadfast._C.cond_aug: ", name, " must be float16, bfloat16, float32 or float64, got ", dt);
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "scadfast._C.cond_aug: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "scadfast._C.cond_aug: ", name, " has dtype ",
              t.scalar_type(), " but a has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "scadfast._C.cond_aug: ", name, " is on ", t.device(),
              " but a is on ", ref.device());
}

// Validates (a, eps) and returns E.
int64_t check_inputs(const at::Tensor& a, const at::Tensor& eps, bool glu) {
  TORCH_CHECK(a.dim() == 2, "scadfast._C.cond_aug: a must be 2-D (B, ", glu ? "4E" : "2E", "), got ",
              a.sizes());
  TORCH_CHECK(eps.dim() == 2, "scadfast._C.cond_aug: eps must be 2-D (B, E), got ", eps.sizes());
  check_floating(a, "a");
  const int64_t E = eps.size(1);
  const int64_t parts = glu ? 4 : 2;
  TORCH_CHECK(a.size(1) == parts * E, "scadfast._C.cond_aug: a must have ", parts, "*E = ", parts * E,
              " columns for ", glu ? "glu" : "relu", " with eps of shape ", eps.sizes(), ", got ", a.sizes());
  check_like(eps, a, "eps", a.size(0), E);
  TORCH_CHECK(a.device().is_cpu() || a.device().is_cuda(), "scadfast._C.cond_aug: unsupported device ",
              a.device());
#ifndef SCADFAST_WITH_CUDA
  TORCH_CHECK(!a.device().is_cuda(),
              "scadfast._C.cond_aug: got CUDA tensors but the extension was built without CUDA kernels "
              "(rebuild with a CUDA toolkit: CUDA_HOME=... pip install --no-build-isolation -e .)");
#endif
  return E;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_aug_forward(const at::Tensor& a,
                                                                              const at::Tensor& eps, bool glu) {
  check_inputs(a, eps, glu);
  const auto a_c = a.contiguous();
  const auto eps_c = eps.contiguous();
#ifdef SCADFAST_WITH_CUDA
  if (a.device().is_cuda()) return scadfast::cond_aug_forward_cuda(a_c, eps_c, glu);
#endif
  return scadfast::cond_aug_forward_cpu(a_c, eps_c, glu);
}

std::tuple<at::Tensor, at::Tensor> cond_aug_backward(const at::Tensor& a, const at::Tensor& eps,
                                                     const at::Tensor& grad_c, const at::Tensor& grad_mu,
                                                     const at::Tensor& grad_logvar, const at::Tensor& grad_kl,
                                                     bool glu) {
  const int64_t E = check_inputs(a, eps, glu);
  const int64_t B = a.size(0);
  check_like(grad_c, a, "grad_c_hat", B, E);
  check_like(grad_mu, a, "grad_mu", B, E);
  check_like(grad_logvar, a, "grad_logvar", B, E);
  TORCH_CHECK(grad_kl.numel() == 1, "scadfast._C.cond_aug: grad_kl must have one element, got shape ",
              grad_kl.sizes());
  TORCH_CHECK(grad_kl.device() == a.device(), "scadfast._C.cond_aug: grad_kl is on ", grad_kl.device(),
              " but a is on ", a.device());
  check_floating(grad_kl, "grad_kl");
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto gkl = grad_kl.reshape({}).to(acc_dtype).contiguous();
  const auto a_c = a.contiguous();
  const auto eps_c = eps.contiguous();
  const auto gc = grad_c.contiguous();
  const auto gmu = grad_mu.contiguous();
  const auto glv = grad_logvar.contiguous();
#ifdef SCADFAST_WITH_CUDA
  if (a.device().is_cuda()) return scadfast::cond_aug_backward_cuda(a_c, eps_c, gc, gmu, glv, gkl, glu);
#endif
  return scadfast::cond_aug_backward_cpu(a_c, eps_c, gc, gmu, glv, gkl, glu);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "scadfast C++/CUDA extension: fused conditioning augmentation (docs/design.md §6, §7)";
  m.def("has_cuda", &has_cuda, "True when the extension was compiled with its CUDA kernels.");
  m.def("cond_aug_forward", &cond_aug_forward, "Fused CA forward: (a, eps, glu) -> (c_hat, mu, logvar, kl)",
        py::arg("a"), py::arg("eps"), py::arg("glu"));
  m.def("cond_aug_backward", &cond_aug_backward,
        "Fused CA backward: (a, eps, grad_c_hat, grad_mu, grad_logvar, grad_kl, glu) -> (grad_a, grad_eps)",
        py::arg("a"), py::arg("eps"), py::arg("grad_c_hat"), py::arg("grad_mu"), py::arg("grad_logvar"),
        py::arg("grad_kl"), py::arg("glu"));
}
