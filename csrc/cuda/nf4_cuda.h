// Host launchers of the CUDA NF4 kernels: raw pointers, sizes and a stream, no torch types,
// so that the .cu files compile without torch/extension.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastpeft {
namespace cuda {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[i] = dtype(code[nibble(i)] * absmax[i / blocksize]) for i < numel.
cudaError_t launch_nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t numel,
                                  std::int64_t blocksize, void* out, Dtype out_dtype, cudaStream_t stream);

// y[N] = x[K] · dequant(W)ᵀ (+ bias[N]), one activation row (decode GEMV). x, bias and y share `dtype`.
// Needs K % 64 == 0, K % blocksize == 0 and `packed` 16-byte aligned (one 128-bit load per lane).
cudaError_t launch_nf4_gemv(const void* x, const std::uint8_t* packed, const float* absmax, const void* bias, void* y,
                            std::int64_t N, std::int64_t K, std::int64_t blocksize, Dtype dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastpeft
