// Per-element math of the fused conditioning augmentation, shared by the CPU (.cpp) and CUDA (.cu)
// kernels so both compute exactly the same formulas. `T` is the accumulation type (float/double).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SCADFAST_HD __host__ __device__ __forceinline__
#else
#define SCADFAST_HD inline
#endif

namespace scadfast {
namespace cond_aug_math {

SCADFAST_HD float exp_(float x) { return ::expf(x); }
SCADFAST_HD double exp_(double x) { return ::exp(x); }

template <typename T>
SCADFAST_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Forward of one (row, column) element. For glu, (x_mu, g_mu) and (x_lv, g_lv) are the value and
// gate pre-activations of mu and logvar; for relu the gates are unused.
template <typename T>
struct Fwd {
  T mu, lv, c, kl_term;  // kl_term = 1 + lv - mu^2 - exp(lv)
};

template <typename T>
SCADFAST_HD Fwd<T> forward(bool glu, T x_mu, T g_mu, T x_lv, T g_lv, T eps) {
  Fwd<T> r;
  if (glu) {
    r.mu = x_mu * sigmoid(g_mu);
    r.lv = x_lv * sigmoid(g_lv);
  } else {
    r.mu = x_mu > T(0) ? x_mu : T(0);
    r.lv = x_lv > T(0) ? x_lv : T(0);
  }
  const T var = exp_(r.lv);
  const T std = exp_(T(0.5) * r.lv);
  r.c = r.mu + std * eps;
  r.kl_term = T(1) + r.lv - r.mu * r.mu - var;
  return r;
}

// Backward of one element. kl_scale = grad_kl / (B * E).
//   dL/dmu = grad_mu + grad_c + kl_scale * mu
//   dL/dlv = grad_lv + grad_c * eps * std / 2 - kl_scale * (1 - exp(lv)) / 2
//   dL/deps = grad_c * std
// then through the GLU (d(x*sig(g))/dx = sig(g), d/dg = x*sig(g)*(1-sig(g))) or the ReLU mask.
template <typename T>
struct Bwd {
  T d_x_mu, d_g_mu, d_x_lv, d_g_lv, d_eps;
};

template <typename T>
SCADFAST_HD Bwd<T> backward(bool glu, T x_mu, T g_mu, T x_lv, T g_lv, T eps, T gc, T gmu, T glv,
                            T kl_scale) {
  T mu, lv, s_mu = T(0), s_lv = T(0);
  if (glu) {
    s_mu = sigmoid(g_mu);
    s_lv = sigmoid(g_lv);
    mu = x_mu * s_mu;
    lv = x_lv * s_lv;
  } else {
    mu = x_mu > T(0) ? x_mu : T(0);
    lv = x_lv > T(0) ? x_lv : T(0);
  }
  const T std = exp_(T(0.5) * lv);
  const T var = exp_(lv);
  const T d_mu = gmu + gc + kl_scale * mu;
  const T d_lv = glv + T(0.5) * gc * eps * std - T(0.5) * kl_scale * (T(1) - var);
  Bwd<T> r;
  r.d_eps = gc * std;
  if (glu) {
    r.d_x_mu = d_mu * s_mu;
    r.d_g_mu = d_mu * x_mu * s_mu * (T(1) - s_mu);
    r.d_x_lv = d_lv * s_lv;
    r.d_g_lv = d_lv * x_lv * s_lv * (T(1) - s_lv);
  } else {
    r.d_x_mu = x_mu > T(0) ? d_mu : T(0);
    r.d_x_lv = x_lv > T(0) ? d_lv : T(0);
    r.d_g_mu = T(0);
    r.d_g_lv = T(0);
  }
  return r;
}

}  // namespace cond_aug_math
}  // namespace scadfast
