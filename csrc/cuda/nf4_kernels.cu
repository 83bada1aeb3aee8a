// CUDA NF4 kernels: dequantize, and a decode GEMV for one activation row.
//
// The element arithmetic (code table, nibble order, one-multiply decode) is
// the shared header's, tested on the CPU build. Launch errors are returned
// to the caller (the torch binding turns them into exceptions).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastpeft/nf4_codec.h"
#include "nf4_cuda.h"

namespace fastpeft {
namespace cuda {
namespace {

namespace nf4 = fastpeft::nf4;

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// An fp32 value rounded to T (round to nearest even) and back: the dequantized weight in the activation dtype.
template <typename T>
struct RoundTo {
  __host__ __device__ __forceinline__ float operator()(float v) const { return to_float(from_float<T>(v)); }
};

// The code table in shared memory: indexing nf4::code_value's local array with a runtime
// index would put it in per-thread local memory.
__device__ __forceinline__ void load_code_table(float* code) {
  if (threadIdx.x < nf4::kNumCodes) code[threadIdx.x] = nf4::code_value(threadIdx.x);
  __syncthreads();
}

// Each thread expands one packed byte (two elements).
template <typename T>
__global__ void dequantize_kernel(const std::uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                  std::int64_t numel, std::int64_t blocksize, T* __restrict__ out) {
  __shared__ float code[nf4::kNumCodes];
  load_code_table(code);
  const std::int64_t nbytes = (numel + 1) / 2;
  for (std::int64_t j = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; j < nbytes;
       j += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::uint8_t byte = packed[j];
    const std::int64_t i = 2 * j;  // blocksize is even: both elements share a block
    const float scale = absmax[i / blocksize];
    // one fp32 multiply, as nf4::decode
    out[i] = from_float<T>(code[nf4::high_nibble(byte)] * scale);
    if (i + 1 < numel) out[i + 1] = from_float<T>(code[nf4::low_nibble(byte)] * scale);
  }
}

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;      // one warp per output row
constexpr int kElemsPerLane = 32;     // 16 packed bytes: one 128-bit load

// Warp per output row: each lane decodes 32 elements from one 128-bit load per
// step, the warp covers 1024 elements per step; partial sums reduce by shuffles.
// Each weight is dequantized alone and rounded to T before its product (nf4::gemv_term), as bitsandbytes and
// the Triton kernels compute it; the block scale never multiplies a partial sum.
template <typename T>
__global__ void gemv_kernel(const T* __restrict__ x, const std::uint8_t* __restrict__ packed,
                            const float* __restrict__ absmax, const T* __restrict__ bias, T* __restrict__ y,
                            std::int64_t N, std::int64_t K, std::int64_t blocksize) {
  __shared__ float code[nf4::kNumCodes];
  load_code_table(code);

  const int lane = threadIdx.x % kWarp;
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  const std::uint8_t* row = packed + n * (K / 2);
  const float* scales = absmax + n * (K / blocksize);

  float acc = 0.0f;
  for (std::int64_t k0 = static_cast<std::int64_t>(lane) * kElemsPerLane; k0 < K; k0 += kWarp * kElemsPerLane) {
    const uint4 word = *reinterpret_cast<const uint4*>(row + k0 / 2);
    const std::uint32_t parts[4] = {word.x, word.y, word.z, word.w};
    const float scale = scales[k0 / blocksize];  // 32 | 64 <= blocksize: one block per lane step
#pragma unroll
    for (int p = 0; p < 4; ++p) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const std::uint8_t byte = static_cast<std::uint8_t>(parts[p] >> (8 * b));
        const std::int64_t k = k0 + 8 * p + 2 * b;
        acc += nf4::gemv_byte_terms(code, byte, scale, to_float(x[k]), to_float(x[k + 1]), RoundTo<T>());
      }
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) y[n] = from_float<T>(bias != nullptr ? acc + to_float(bias[n]) : acc);
}

int grid_for(std::int64_t work, int threads) {
  const std::int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace

cudaError_t launch_nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t numel,
                                  std::int64_t blocksize, void* out, Dtype out_dtype, cudaStream_t stream) {
  constexpr int threads = 256;
  const int grid = grid_for((numel + 1) / 2, threads);
  switch (out_dtype) {
    case Dtype::kFloat32:
      dequantize_kernel<float><<<grid, threads, 0, stream>>>(packed, absmax, numel, blocksize, static_cast<float*>(out));
      break;
    case Dtype::kFloat16:
      dequantize_kernel<__half><<<grid, threads, 0, stream>>>(packed, absmax, numel, blocksize, static_cast<__half*>(out));
      break;
    case Dtype::kBFloat16:
      dequantize_kernel<__nv_bfloat16>
          <<<grid, threads, 0, stream>>>(packed, absmax, numel, blocksize, static_cast<__nv_bfloat16*>(out));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_nf4_gemv(const void* x, const std::uint8_t* packed, const float* absmax, const void* bias, void* y,
                            std::int64_t N, std::int64_t K, std::int64_t blocksize, Dtype dtype, cudaStream_t stream) {
  if (K % 64 != 0 || K % blocksize != 0 || reinterpret_cast<std::uintptr_t>(packed) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  const dim3 block(kWarp * kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock));
  switch (dtype) {
    case Dtype::kFloat32:
      gemv_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(x), packed, absmax,
                                                     static_cast<const float*>(bias), static_cast<float*>(y), N, K,
                                                     blocksize);
      break;
    case Dtype::kFloat16:
      gemv_kernel<__half><<<grid, block, 0, stream>>>(static_cast<const __half*>(x), packed, absmax,
                                                      static_cast<const __half*>(bias), static_cast<__half*>(y), N, K,
                                                      blocksize);
      break;
    case Dtype::kBFloat16:
      gemv_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), packed, absmax, static_cast<const __nv_bfloat16*>(bias),
          static_cast<__nv_bfloat16*>(y), N, K, blocksize);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastpeft
