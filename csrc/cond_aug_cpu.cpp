// CPU kernels of the fused conditioning augmentation (see cond_aug.h for the contract).
//
// Rows are split across threads with at::parallel_for. The forward writes one KL partial sum per
// row and reduces the B partials serially in row order afterwards, so the result does not depend
// on the number of threads.

#include "cond_aug.h"
#include "cond_aug_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace scadfast {

namespace {

// Rows per parallel task: enough work per task to amortise the scheduling (~16K elements).
int64_t row_grain(int64_t E) {
  const int64_t target = 16384;
  return std::max<int64_t>(1, target / std::max<int64_t>(E, 1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_aug_forward_cpu(
    const at::Tensor& a, const at::Tensor& eps, bool glu) {
  const int64_t B = a.size(0);
  const int64_t E = eps.size(1);
  const int64_t width = a.size(1);  // 4E (glu) or 2E (relu)
  auto c_hat = at::empty({B, E}, a.options());
  auto mu = at::empty({B, E}, a.options());
  auto logvar = at::empty({B, E}, a.options());
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto kl = at::empty({}, a.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cond_aug_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a_p = a.const_data_ptr<scalar_t>();
    const scalar_t* eps_p = eps.const_data_ptr<scalar_t>();
    scalar_t* c_p = c_hat.mutable_data_ptr<scalar_t>();
    scalar_t* mu_p = mu.mutable_data_ptr<scalar_t>();
    scalar_t* lv_p = logvar.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> partial(static_cast<size_t>(B), acc_t(0));

    at::parallel_for(0, B, row_grain(E), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* ar = a_p + i * width;
        const scalar_t* er = eps_p + i * E;
        acc_t row_sum = acc_t(0);
        for (int64_t j = 0; j < E; ++j) {
          const acc_t x_mu = static_cast<acc_t>(ar[j]);
          const acc_t x_lv = static_cast<acc_t>(ar[E + j]);
          const acc_t g_mu = glu ? static_cast<acc_t>(ar[2 * E + j]) : acc_t(0);
          const acc_t g_lv = glu ? static_cast<acc_t>(ar[3 * E + j]) : acc_t(0);
          const auto r = cond_aug_math::forward<acc_t>(glu, x_mu, g_mu, x_lv, g_lv,
                                                       static_cast<acc_t>(er[j]));
          c_p[i * E + j] = static_cast<scalar_t>(r.c);
          mu_p[i * E + j] = static_cast<scalar_t>(r.mu);
          lv_p[i * E + j] = static_cast<scalar_t>(r.lv);
          row_sum += r.kl_term;
        }
        partial[static_cast<size_t>(i)] = row_sum;
      }
    });

    acc_t total = acc_t(0);
    for (int64_t i = 0; i < B; ++i) total += partial[static_cast<size_t>(i)];
    const acc_t n = static_cast<acc_t>(B) * static_cast<acc_t>(E);
    // An empty batch gives a NaN mean, like torch.mean of an empty tensor.
    *kl.mutable_data_ptr<acc_t>() = acc_t(-0.5) * total / n;
  });
  return {c_hat, mu, logvar, kl};
}

std::tuple<at::Tensor, at::Tensor> cond_aug_backward_cpu(
    const at::Tensor& a, const at::Tensor& eps, const at::Tensor& grad_c, const at::Tensor& grad_mu,
    const at::Tensor& grad_logvar, const at::Tensor& grad_kl, bool glu) {
  const int64_t B = a.size(0);
  const int64_t E = eps.size(1);
  const int64_t width = a.size(1);
  auto grad_a = at::empty_like(a);
  auto grad_eps = at::empty_like(eps);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cond_aug_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a_p = a.const_data_ptr<scalar_t>();
    const scalar_t* eps_p = eps.const_data_ptr<scalar_t>();
    const scalar_t* gc_p = grad_c.const_data_ptr<scalar_t>();
    const scalar_t* gmu_p = grad_mu.const_data_ptr<scalar_t>();
    const scalar_t* glv_p = grad_logvar.const_data_ptr<scalar_t>();
    scalar_t* ga_p = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* ge_p = grad_eps.mutable_data_ptr<scalar_t>();
    const acc_t n = static_cast<acc_t>(B) * static_cast<acc_t>(E);
    const acc_t kl_scale = grad_kl.item<acc_t>() / n;

    at::parallel_for(0, B, row_grain(E), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* ar = a_p + i * width;
        scalar_t* gar = ga_p + i * width;
        for (int64_t j = 0; j < E; ++j) {
          const int64_t k = i * E + j;
          const acc_t g_mu = glu ? static_cast<acc_t>(ar[2 * E + j]) : acc_t(0);
          const acc_t g_lv = glu ? static_cast<acc_t>(ar[3 * E + j]) : acc_t(0);
          const auto r = cond_aug_math::backward<acc_t>(
              glu, static_cast<acc_t>(ar[j]), g_mu, static_cast<acc_t>(ar[E + j]), g_lv,
              static_cast<acc_t>(eps_p[k]), static_cast<acc_t>(gc_p[k]), static_cast<acc_t>(gmu_p[k]),
              static_cast<acc_t>(glv_p[k]), kl_scale);
          gar[j] = static_cast<scalar_t>(r.d_x_mu);
          gar[E + j] = static_cast<scalar_t>(r.d_x_lv);
          if (glu) {
            gar[2 * E + j] = static_cast<scalar_t>(r.d_g_mu);
            gar[3 * E + j] = static_cast<scalar_t>(r.d_g_lv);
          }
          ge_p[k] = static_cast<scalar_t>(r.d_eps);
        }
      }
    });
  });
  return {grad_a, grad_eps};
}

}  // namespace scadfast
