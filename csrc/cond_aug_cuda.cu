// CUDA kernels of the fused conditioning augmentation (see cond_aug.h for the contract).
//
// Forward: ONE kernel. Block b handles a contiguous range of the B*E flattened (row, column)
// elements (whole rows when E divides the range), writes c_hat/mu/logvar, reduces its KL terms to
// one partial sum and stores it in a small workspace. The last block to finish (detected with a
// completion counter, the "threadfence reduction" pattern) sums the partials in block order and
// writes the mean, so the KL needs no second kernel and is deterministic for a given grid. The
// counter is zeroed with a 4-byte cudaMemsetAsync on the same stream before the launch.
//
// Backward: ONE elementwise kernel; grad_kl is read from device memory (no host sync).

#include "cond_aug.h"
#include "cond_aug_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>

namespace scadfast {

namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 4;  // target work per thread before the grid is capped

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0. `shared` holds kThreads / 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // `shared` may be reused by the caller
  return v;
}

template <typename scalar_t, typename acc_t, bool GLU>
__global__ void __launch_bounds__(kThreads)
    cond_aug_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ eps,
                            scalar_t* __restrict__ c_hat, scalar_t* __restrict__ mu,
                            scalar_t* __restrict__ logvar, acc_t* __restrict__ partials,
                            unsigned int* __restrict__ counter, acc_t* __restrict__ kl, int64_t E,
                            int64_t N, int64_t chunk, acc_t scale) {
  __shared__ acc_t shared[kThreads / 32];
  __shared__ bool is_last;
  const int64_t width = GLU ? 4 * E : 2 * E;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < N ? begin + chunk : N;

  acc_t sum = acc_t(0);
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const int64_t i = k / E;
    const int64_t j = k - i * E;
    const scalar_t* ar = a + i * width;
    const acc_t g_mu = GLU ? static_cast<acc_t>(ar[2 * E + j]) : acc_t(0);
    const acc_t g_lv = GLU ? static_cast<acc_t>(ar[3 * E + j]) : acc_t(0);
    const auto r = cond_aug_math::forward<acc_t>(GLU, static_cast<acc_t>(ar[j]), g_mu,
                                                 static_cast<acc_t>(ar[E + j]), g_lv,
                                                 static_cast<acc_t>(eps[k]));
    c_hat[k] = static_cast<scalar_t>(r.c);
    mu[k] = static_cast<scalar_t>(r.mu);
    logvar[k] = static_cast<scalar_t>(r.lv);
    sum += r.kl_term;
  }

  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum;
    __threadfence();  // make the partial visible to the block that finishes last
    const unsigned int done = atomicAdd(counter, 1u);
    is_last = (done == gridDim.x - 1);
  }
  __syncthreads();
  if (!is_last) return;

  // The last block: sum the partials in block order (deterministic), bypassing L1.
  acc_t total = acc_t(0);
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x) total += __ldcg(partials + b);
  total = block_sum(total, shared);
  if (threadIdx.x == 0) *kl = scale * total;
}

template <typename scalar_t, typename acc_t, bool GLU>
__global__ void __launch_bounds__(kThreads)
    cond_aug_backward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ eps,
                             const scalar_t* __restrict__ grad_c, const scalar_t* __restrict__ grad_mu,
                             const scalar_t* __restrict__ grad_lv, const acc_t* __restrict__ grad_kl,
                             scalar_t* __restrict__ grad_a, scalar_t* __restrict__ grad_eps, int64_t E,
                             int64_t N, acc_t inv_n) {
  const acc_t kl_scale = *grad_kl * inv_n;
  const int64_t width = GLU ? 4 * E : 2 * E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < N; k += stride) {
    const int64_t i = k / E;
    const int64_t j = k - i * E;
    const scalar_t* ar = a + i * width;
    scalar_t* gar = grad_a + i * width;
    const acc_t g_mu = GLU ? static_cast<acc_t>(ar[2 * E + j]) : acc_t(0);
    const acc_t g_lv = GLU ? static_cast<acc_t>(ar[3 * E + j]) : acc_t(0);
    const auto r = cond_aug_math::backward<acc_t>(
        GLU, static_cast<acc_t>(ar[j]), g_mu, static_cast<acc_t>(ar[E + j]), g_lv,
        static_cast<acc_t>(eps[k]), static_cast<acc_t>(grad_c[k]), static_cast<acc_t>(grad_mu[k]),
        static_cast<acc_t>(grad_lv[k]), kl_scale);
    gar[j] = static_cast<scalar_t>(r.d_x_mu);
    gar[E + j] = static_cast<scalar_t>(r.d_x_lv);
    if (GLU) {
      gar[2 * E + j] = static_cast<scalar_t>(r.d_g_mu);
      gar[3 * E + j] = static_cast<scalar_t>(r.d_g_lv);
    }
    grad_eps[k] = static_cast<scalar_t>(r.d_eps);
  }
}

// Grid cap: 8 blocks of kThreads per SM (the device of the current guard).
// (c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers.)
int64_t max_blocks() {
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int64_t>(sms) * 8;
}

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_aug_forward_cuda(
    const at::Tensor& a, const at::Tensor& eps, bool glu) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t B = a.size(0);
  const int64_t E = eps.size(1);
  const int64_t N = B * E;
  auto c_hat = at::empty({B, E}, a.options());
  auto mu = at::empty({B, E}, a.options());
  auto logvar = at::empty({B, E}, a.options());
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto kl = at::empty({}, a.options().dtype(acc_dtype));
  if (N == 0) {  // torch.mean of an empty tensor is NaN
    kl.fill_(std::numeric_limits<double>::quiet_NaN());
    return {c_hat, mu, logvar, kl};
  }

  const int64_t grid = std::min(ceil_div(N, int64_t(kThreads) * kElemsPerThread), max_blocks());
  const int64_t chunk = ceil_div(N, grid);
  auto partials = at::empty({grid}, a.options().dtype(acc_dtype));
  auto counter = at::empty({1}, a.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(counter.mutable_data_ptr(), 0, sizeof(unsigned int), stream));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cond_aug_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = acc_t(-0.5) / (static_cast<acc_t>(B) * static_cast<acc_t>(E));
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(), c_hat.mutable_data_ptr<scalar_t>(),
          mu.mutable_data_ptr<scalar_t>(), logvar.mutable_data_ptr<scalar_t>(),
          partials.mutable_data_ptr<acc_t>(), static_cast<unsigned int*>(counter.mutable_data_ptr()),
          kl.mutable_data_ptr<acc_t>(), E, N, chunk, scale);
    };
    if (glu) {
      launch(cond_aug_forward_kernel<scalar_t, acc_t, true>);
    } else {
      launch(cond_aug_forward_kernel<scalar_t, acc_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c_hat, mu, logvar, kl};
}

std::tuple<at::Tensor, at::Tensor> cond_aug_backward_cuda(
    const at::Tensor& a, const at::Tensor& eps, const at::Tensor& grad_c, const at::Tensor& grad_mu,
    const at::Tensor& grad_logvar, const at::Tensor& grad_kl, bool glu) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t B = a.size(0);
  const int64_t E = eps.size(1);
  const int64_t N = B * E;
  auto grad_a = at::empty_like(a);
  auto grad_eps = at::empty_like(eps);
  if (N == 0) return {grad_a, grad_eps};

  const int64_t grid = std::min(ceil_div(N, int64_t(kThreads)), max_blocks());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cond_aug_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_n = acc_t(1) / (static_cast<acc_t>(B) * static_cast<acc_t>(E));
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(), grad_c.const_data_ptr<scalar_t>(),
          grad_mu.const_data_ptr<scalar_t>(), grad_logvar.const_data_ptr<scalar_t>(),
          grad_kl.const_data_ptr<acc_t>(), grad_a.mutable_data_ptr<scalar_t>(),
          grad_eps.mutable_data_ptr<scalar_t>(), E, N, inv_n);
    };
    if (glu) {
      launch(cond_aug_backward_kernel<scalar_t, acc_t, true>);
    } else {
      launch(cond_aug_backward_kernel<scalar_t, acc_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, grad_eps};
}

}  // namespace scadfast
