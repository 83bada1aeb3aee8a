// NF4 -> bfloat16 dequantization of a tile of W, for the bf16 CPU path (dequantize, then a bf16 GEMM).
//
// Each element is the format's exact value bf16(fp32(code[q] * absmax)) (docs/architecture.md, "NF4 and
// bitsandbytes"), rounded to nearest-even as c10::BFloat16 rounds (subnormals kept, NaN -> 0x7FC0), so the
// tile is bit-equal to NF4Weight.dequantize(torch.bfloat16) (NaN for NaN; torch may pick other NaN bits).
// Raw pointers, OpenMP over rows.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

namespace fastpeft {
namespace cpu {

// Columns of a tile start and end on multiples of this (K % blocksize == 0 and blocksize >= 64 make every
// 64-element group of a row lie inside one block).
constexpr std::int64_t kBf16TileColumnAlign = 64;

// out[(n - row_begin) * ld_out + (k - col_begin)] = dequant(W)[n, k] for n in [row_begin, row_end),
// k in [col_begin, col_end). W is [N, K] row-major NF4 with K % blocksize == 0; col_begin and col_end are
// multiples of kBf16TileColumnAlign (col_end may also be K).
void nf4_dequantize_tile_bf16(const std::uint8_t* packed, const float* absmax, std::int64_t K,
                              std::int64_t blocksize, std::int64_t row_begin, std::int64_t row_end,
                              std::int64_t col_begin, std::int64_t col_end, c10::BFloat16* out, std::int64_t ld_out);

// The same tile in fp32 (fp32(code[q] * absmax), bit-equal to NF4Weight.dequantize(torch.float32)).
void nf4_dequantize_tile_f32(const std::uint8_t* packed, const float* absmax, std::int64_t K, std::int64_t blocksize,
                             std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin,
                             std::int64_t col_end, float* out, std::int64_t ld_out);

// True when this build dequantizes tiles with AVX-512 (otherwise a portable scalar loop).
bool bf16_simd_enabled();

// ---- fused NF4 x bf16 GEMM on AMX tiles (nf4_amx.cpp) ---------------------------------------------
// y[M, N] = x[M, K] · dequant(W)ᵀ (+ bias[N] when bias != nullptr), fp32 accumulation, bf16 out; x and y
// row-major contiguous, K % 64 == 0. Only valid when amx_bf16_available().
void nf4_matmul_bf16_amx(const c10::BFloat16* x, std::int64_t M, const std::uint8_t* packed, const float* absmax,
                         std::int64_t N, std::int64_t K, std::int64_t blocksize, const c10::BFloat16* bias,
                         c10::BFloat16* y);

// dx[M, K] = dy[M, N] · dequant(W), fp32 accumulation, bf16 out; dy and dx row-major contiguous.
// Only valid when amx_bf16_available().
void nf4_matmul_transposed_bf16_amx(const c10::BFloat16* dy, std::int64_t M, const std::uint8_t* packed,
                                    const float* absmax, std::int64_t N, std::int64_t K, std::int64_t blocksize,
                                    c10::BFloat16* dx);

// True when this build has the AMX kernels and the OS lets this process use AMX tiles (asked once).
bool amx_bf16_available();

}  // namespace cpu
}  // namespace fastpeft
