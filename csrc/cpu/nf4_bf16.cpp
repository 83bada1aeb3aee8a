// NF4 -> bf16 tile dequantization (see nf4_bf16_kernels.h).
//
// AVX-512 form: per block, the 16 possible outputs bf16(code[c] * absmax) are computed once (one fp32
// multiply of the code vector, rounded to bf16 with integer ops exactly as c10::BFloat16 rounds) and kept
// as a 16-entry word table; each 16 packed bytes are widened to 32-bit lanes, split into their two nibbles
// as two 16-bit indices (element 2j in the low word, 2j+1 in the high one: element order in memory), and one
// vpermw looks up 32 outputs. About 7 instructions per 32 elements and no float work per element.
#include <algorithm>

#include "fastpeft/nf4_codec.h"
#include "nf4_bf16_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FASTPEFT_NF4_BF16_AVX512 1
#include <immintrin.h>
#endif

namespace fastpeft {
namespace cpu {

namespace {

#if defined(FASTPEFT_NF4_BF16_AVX512)
// bf16 bits of 16 fp32 values, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rounding).
inline __m256i round_to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
}

struct Bf16Decoder {
  __m512 codes;
  __m512i low_nibble = _mm512_set1_epi32(0x0F);

  Bf16Decoder() {
    alignas(64) float c[nf4::kNumCodes];
    for (int i = 0; i < nf4::kNumCodes; ++i) c[i] = nf4::code_value(i);
    codes = _mm512_load_ps(c);
  }

  // The 16 outputs of a block with scale `absmax`, as words 0..15 of a vpermw table.
  __m512i table(float absmax) const {
    return _mm512_castsi256_si512(round_to_bf16_bits(_mm512_mul_ps(codes, _mm512_set1_ps(absmax))));
  }

  // 32 bf16 outputs of the 32 elements held in bytes[0..15].
  void decode32(const std::uint8_t* bytes, __m512i table, c10::BFloat16* out) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, low_nibble), 16));
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(idx, table));
  }
};
#endif

}  // namespace

void nf4_dequantize_tile_bf16(const std::uint8_t* packed, const float* absmax, std::int64_t K,
                              std::int64_t blocksize, std::int64_t row_begin, std::int64_t row_end,
                              std::int64_t col_begin, std::int64_t col_end, c10::BFloat16* out, std::int64_t ld_out) {
#if defined(FASTPEFT_NF4_BF16_AVX512)
  const Bf16Decoder decoder;
#endif
#pragma omp parallel for schedule(static)
  for (std::int64_t n = row_begin; n < row_end; ++n) {
    const std::uint8_t* row = packed + n * (K / 2);
    const float* scales = absmax + n * (K / blocksize);
    c10::BFloat16* dst = out + (n - row_begin) * ld_out - col_begin;
    for (std::int64_t k0 = col_begin; k0 < col_end;) {
      const std::int64_t block = k0 / blocksize;
      const std::int64_t k1 = std::min(col_end, (block + 1) * blocksize);
#if defined(FASTPEFT_NF4_BF16_AVX512)
      const __m512i table = decoder.table(scales[block]);
      for (std::int64_t k = k0; k < k1; k += 32) decoder.decode32(row + k / 2, table, dst + k);
#else
      c10::BFloat16 table[nf4::kNumCodes];
      for (int c = 0; c < nf4::kNumCodes; ++c)
        table[c] = static_cast<c10::BFloat16>(nf4::decode(static_cast<std::uint8_t>(c), scales[block]));
      for (std::int64_t k = k0; k < k1; k += 2) {
        const std::uint8_t byte = row[k / 2];
        dst[k] = table[nf4::high_nibble(byte)];
        dst[k + 1] = table[nf4::low_nibble(byte)];
      }
#endif
      k0 = k1;
    }
  }
}

void nf4_dequantize_tile_f32(const std::uint8_t* packed, const float* absmax, std::int64_t K, std::int64_t blocksize,
                             std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin,
                             std::int64_t col_end, float* out, std::int64_t ld_out) {
#if defined(FASTPEFT_NF4_BF16_AVX512)
  alignas(64) float code_array[nf4::kNumCodes];
  for (int i = 0; i < nf4::kNumCodes; ++i) code_array[i] = nf4::code_value(i);
  const __m512 codes = _mm512_load_ps(code_array);
  const __m512i low_nibble = _mm512_set1_epi64(0x0F);
#endif
#pragma omp parallel for schedule(static)
  for (std::int64_t n = row_begin; n < row_end; ++n) {
    const std::uint8_t* row = packed + n * (K / 2);
    const float* scales = absmax + n * (K / blocksize);
    float* dst = out + (n - row_begin) * ld_out - col_begin;
    for (std::int64_t k0 = col_begin; k0 < col_end;) {
      const std::int64_t block = k0 / blocksize;
      const std::int64_t k1 = std::min(col_end, (block + 1) * blocksize);
#if defined(FASTPEFT_NF4_BF16_AVX512)
      // table[c] = fp32(code[c] * absmax): the format's exact product; 8 bytes -> 16 indices, one vpermps
      const __m512 table = _mm512_mul_ps(codes, _mm512_set1_ps(scales[block]));
      for (std::int64_t k = k0; k < k1; k += 16) {
        const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi64(b, 4), _mm512_slli_epi64(_mm512_and_si512(b, low_nibble), 32));
        _mm512_storeu_ps(dst + k, _mm512_permutexvar_ps(idx, table));
      }
#else
      float table[nf4::kNumCodes];
      for (int c = 0; c < nf4::kNumCodes; ++c) table[c] = nf4::decode(static_cast<std::uint8_t>(c), scales[block]);
      for (std::int64_t k = k0; k < k1; k += 2) {
        const std::uint8_t byte = row[k / 2];
        dst[k] = table[nf4::high_nibble(byte)];
        dst[k + 1] = table[nf4::low_nibble(byte)];
      }
#endif
      k0 = k1;
    }
  }
}

bool bf16_simd_enabled() {
#if defined(FASTPEFT_NF4_BF16_AVX512)
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastpeft
