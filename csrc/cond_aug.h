// Conditioning augmentation (StackGAN, docs/design.md §6): the elementwise part, fused.
//
// The linear layer a = s @ W^T + b stays a matmul in PyTorch. These kernels take the
// pre-activation `a` and the noise `eps` and do everything after it in one pass:
//
//   glu:  a is (B, 4E);  mu = a[:, 0:E]   * sigmoid(a[:, 2E:3E])
//                         lv = a[:, E:2E]  * sigmoid(a[:, 3E:4E])        (F.glu(a, dim=1) split in two)
//   relu: a is (B, 2E);  mu = relu(a[:, 0:E]),  lv = relu(a[:, E:2E])
//   c_hat = mu + exp(lv / 2) * eps
//   kl    = -0.5 * mean(1 + lv - mu^2 - exp(lv))                          (a 0-dim tensor)
//
// Arithmetic is done in at::opmath_type<scalar_t> (fp32 for fp16/bf16/fp32, fp64 for fp64);
// c_hat, mu, logvar are stored in the input dtype, kl in the accumulation dtype. The KL sum is
// reduced in a fixed order (deterministic for a given shape, device and thread/grid layout).
//
// Backward (one kernel): from grad_c_hat, grad_mu, grad_logvar (B, E) and grad_kl (0-dim,
// accumulation dtype), recompute mu/lv from `a` and write grad_a (B, 4E or 2E, input dtype) and
// grad_eps (B, E, input dtype).
//
// All tensor arguments must be contiguous, on one device, and share the input dtype except
// grad_kl; the host wrappers in bindings.cpp check this and make inputs contiguous.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace scadfast {

// forward: (c_hat, mu, logvar, kl)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_aug_forward_cpu(
    const at::Tensor& a, const at::Tensor& eps, bool glu);

// backward: (grad_a, grad_eps)
std::tuple<at::Tensor, at::Tensor> cond_aug_backward_cpu(
    const at::Tensor& a, const at::Tensor& eps, const at::Tensor& grad_c, const at::Tensor& grad_mu,
    const at::Tensor& grad_logvar, const at::Tensor& grad_kl, bool glu);

#ifdef SCADFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_aug_forward_cuda(
    const at::Tensor& a, const at::Tensor& eps, bool glu);

std::tuple<at::Tensor, at::Tensor> cond_aug_backward_cuda(
    const at::Tensor& a, const at::Tensor& eps, const at::Tensor& grad_c, const at::Tensor& grad_mu,
    const at::Tensor& grad_logvar, const at::Tensor& grad_kl, bool glu);
#endif

}  // namespace scadfast
