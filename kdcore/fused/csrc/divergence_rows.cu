// Per-row softmax + divergence + d loss / d student logits, for the fused path on CUDA.
//
// One thread block per row (position). The row's float32 student and teacher logits (already
// divided by the temperature) are read three or four times from global memory: maxima, sums of
// exponentials, the reductions the loss needs, then the gradient, which overwrites the student
// row in place. This replaces ~20 elementwise PyTorch kernels (each a full pass over the chunk)
// by one launch. The math is the same as kdcore/objectives/divergence.py (see its docstrings);
// tests/objectives/test_objectives_cuda_ext.py checks the two agree.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <math_constants.h>

namespace {

constexpr float kLogFloor = -1e30f;          // stand-in for -inf logits (as LOG_FLOOR in divergence.py)
constexpr float kTiny = 1.17549435e-38f;     // smallest normal float: floor of a mixture probability

enum Kind : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4, kTVD = 5 };

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Reduces two values over the block; every thread gets the results. shared: 64 + 2 floats.
template <bool IsMax>
__device__ void block_reduce2(float (&values)[2], float* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  const float identity = IsMax ? -CUDART_INF_F : 0.0f;
  for (int k = 0; k < 2; ++k) values[k] = IsMax ? warp_max(values[k]) : warp_sum(values[k]);
  if (lane == 0) {
    shared[warp * 2] = values[0];
    shared[warp * 2 + 1] = values[1];
  }
  __syncthreads();
  if (warp == 0) {
    for (int k = 0; k < 2; ++k) {
      float x = lane < warps ? shared[lane * 2 + k] : identity;
      x = IsMax ? warp_max(x) : warp_sum(x);
      if (lane == 0) shared[64 + k] = x;
    }
  }
  __syncthreads();
  values[0] = shared[64];
  values[1] = shared[65];
  __syncthreads();  // the buffer is reused by the next reduction
}

__device__ __forceinline__ float half_sign(float x) { return x > 0.0f ? 0.5f : (x < 0.0f ? -0.5f : 0.0f); }

__global__ void divergence_rows_kernel(float* __restrict__ student, const float* __restrict__ teacher,
                                       float* __restrict__ loss, int64_t vocab, int kind, float beta, float skew) {
  extern __shared__ float shared[];
  float* s = student + static_cast<int64_t>(blockIdx.x) * vocab;
  const float* t = teacher + static_cast<int64_t>(blockIdx.x) * vocab;

  float maxima[2] = {-CUDART_INF_F, -CUDART_INF_F};
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    maxima[0] = fmaxf(maxima[0], fmaxf(s[i], kLogFloor));
    maxima[1] = fmaxf(maxima[1], fmaxf(t[i], kLogFloor));
  }
  block_reduce2<true>(maxima, shared);

  float sums[2] = {0.0f, 0.0f};
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    sums[0] += expf(fmaxf(s[i], kLogFloor) - maxima[0]);
    sums[1] += expf(fmaxf(t[i], kLogFloor) - maxima[1]);
  }
  block_reduce2<false>(sums, shared);
  const float lse_s = maxima[0] + logf(sums[0]);
  const float lse_t = maxima[1] + logf(sums[1]);

  // Reductions the loss and the gradient need: r[0] is the main sum, r[1] a second one per kind.
  float r[2] = {0.0f, 0.0f};
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float ls = fmaxf(s[i], kLogFloor) - lse_s;
    const float lt = fmaxf(t[i], kLogFloor) - lse_t;
    const float ps = expf(ls);
    const float pt = expf(lt);
    switch (kind) {
      case kForwardKL:
        r[0] += pt * (lt - ls);
        s[i] = ps - pt;  // the gradient needs no reduction: write it now
        break;
      case kReverseKL:
        r[0] += ps * (ls - lt);
        break;
      case kJSD: {
        const float lm = logf(fmaxf(beta * pt + (1.0f - beta) * ps, kTiny));
        r[0] += ps * (ls - lm);
        r[1] += pt * (lt - lm);
        break;
      }
      case kSkewForwardKL: {
        const float m = fmaxf(skew * pt + (1.0f - skew) * ps, kTiny);
        r[0] += pt * (lt - logf(m));
        r[1] += pt * ps / m;
        break;
      }
      case kSkewReverseKL: {
        const float m = fmaxf(skew * ps + (1.0f - skew) * pt, kTiny);
        const float lm = logf(m);
        r[0] += ps * (ls - lm);
        r[1] += ps * (ls - lm - skew * ps / m);
        break;
      }
      default: {  // kTVD
        const float d = ps - pt;
        r[0] += fabsf(d);
        r[1] += ps * half_sign(d);
      }
    }
  }
  block_reduce2<false>(r, shared);

  if (kind != kForwardKL) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float ls = fmaxf(s[i], kLogFloor) - lse_s;
      const float lt = fmaxf(t[i], kLogFloor) - lse_t;
      const float ps = expf(ls);
      const float pt = expf(lt);
      float grad;
      switch (kind) {
        case kReverseKL:
          grad = ps * (ls - lt - r[0]);
          break;
        case kJSD: {
          const float lm = logf(fmaxf(beta * pt + (1.0f - beta) * ps, kTiny));
          grad = (1.0f - beta) * ps * (ls - lm - r[0]);
          break;
        }
        case kSkewForwardKL: {
          const float m = fmaxf(skew * pt + (1.0f - skew) * ps, kTiny);
          grad = (1.0f - skew) * (ps * r[1] - pt * ps / m);
          break;
        }
        case kSkewReverseKL: {
          const float m = fmaxf(skew * ps + (1.0f - skew) * pt, kTiny);
          grad = ps * (ls - logf(m) - skew * ps / m - r[1]);
          break;
        }
        default:  // kTVD
          grad = ps * (half_sign(ps - pt) - r[1]);
      }
      s[i] = grad;
    }
  }
  if (threadIdx.x == 0) {
    float value = r[0];
    if (kind == kJSD) value = beta * r[1] + (1.0f - beta) * r[0];
    if (kind == kTVD) value = 0.5f * r[0];
    loss[blockIdx.x] = value;
  }
}

}  // namespace

// student, teacher: contiguous float32 (n, V) CUDA tensors of scaled logits. Returns the (n,)
// per-row loss; the student tensor is overwritten with d loss_row / d student_row.
torch::Tensor divergence_rows(torch::Tensor student, torch::Tensor teacher, int64_t kind, double beta, double skew) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(), "divergence_rows: CUDA tensors expected");
  TORCH_CHECK(student.scalar_type() == torch::kFloat32 && teacher.scalar_type() == torch::kFloat32,
              "divergence_rows: float32 tensors expected");
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), "divergence_rows: equal (n, V) shapes expected");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "divergence_rows: contiguous tensors expected");
  TORCH_CHECK(kind >= 0 && kind <= 5, "divergence_rows: unknown kind");
  const at::cuda::OptionalCUDAGuard guard(student.device());
  const int64_t rows = student.size(0);
  const int64_t vocab = student.size(1);
  auto loss = torch::empty({rows}, student.options());
  if (rows == 0) return loss;
  TORCH_CHECK(rows <= 2147483647LL, "divergence_rows: too many rows for one launch");
  const int threads = vocab >= 8192 ? 1024 : 256;
  const size_t shared_bytes = (64 + 2) * sizeof(float);
  divergence_rows_kernel<<<static_cast<unsigned int>(rows), threads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(
      student.data_ptr<float>(), teacher.data_ptr<float>(), loss.data_ptr<float>(), vocab, static_cast<int>(kind),
      static_cast<float>(beta), static_cast<float>(skew));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("divergence_rows", &divergence_rows, "per-row divergence loss and student-logit gradient (in place)");
}
