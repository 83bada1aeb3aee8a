// CPU NF4 kernels on raw pointers (no torch types beyond c10's Half/BFloat16).
//
// Layout (docs/architecture.md, "NF4 and bitsandbytes"): `packed` holds ceil(numel/2) bytes, element 2j in the
// high nibble of byte j; `absmax` holds one fp32 scale per block of
// `blocksize` consecutive elements of the row-major weight [N, K]. The matmul
// kernels need K % blocksize == 0 so that a block never straddles two rows.
// All loops are parallelised with OpenMP (the runtime torch itself uses).
#pragma once

#include <cstdint>

namespace fastpeft {
namespace cpu {

// ---- format -------------------------------------------------------------
// Quantize `numel` values to NF4 bytes and fp32 block absmax, as bitsandbytes.
template <typename T>
void nf4_quantize(const T* weight, std::int64_t numel, std::int64_t blocksize, std::uint8_t* packed, float* absmax);

// bitsandbytes' blockwise 8-bit quantization against a sorted 256-entry `code`
// (used for the nested absmax): uint8 indices and fp32 absmax per block.
void dynamic_quantize(const float* values, std::int64_t n, std::int64_t blocksize, const float* code,
                      std::uint8_t* out, float* absmax);

// Block scales from double quantization: fp32(code2[q[i]] * absmax2[i / 256]) + offset.
void nested_scales(const std::uint8_t* qabsmax, const float* nested_absmax, const float* code2, float offset,
                   std::int64_t nblocks, float* out);

template <typename T>
void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t numel, std::int64_t blocksize, T* out);

// Rows [row_begin, row_end) of W [N, K] dequantized to fp32, written row-major into `out`.
void nf4_dequantize_rows_f32(const std::uint8_t* packed, const float* absmax, std::int64_t K, std::int64_t blocksize,
                             std::int64_t row_begin, std::int64_t row_end, float* out);

// ---- small-M fused kernels (fp32 activations) ---------------------------
// y[M, N] = x[M, K] · dequant(W)ᵀ  (+ bias[N] when bias != nullptr); x and y row-major, contiguous.
void nf4_gemv(const float* x, std::int64_t M, const std::uint8_t* packed, const float* absmax, std::int64_t N,
              std::int64_t K, std::int64_t blocksize, const float* bias, float* y);

// dx[M, K] = dy[M, N] · dequant(W); dy and dx row-major, contiguous.
void nf4_gemv_transposed(const float* dy, std::int64_t M, const std::uint8_t* packed, const float* absmax,
                         std::int64_t N, std::int64_t K, std::int64_t blocksize, float* dx);

// Largest M the fused small-M kernels take; larger M use dequantized row panels and a BLAS GEMM.
// The transposed kernel read-modify-writes a [M, K] partial per thread, which leaves L1 beyond 4 rows.
constexpr std::int64_t kMaxGemvRows = 8;
constexpr std::int64_t kMaxGemvTransposedRows = 4;

// True when this build decodes with AVX2 (otherwise a portable scalar loop).
bool simd_enabled();

}  // namespace cpu
}  // namespace fastpeft
