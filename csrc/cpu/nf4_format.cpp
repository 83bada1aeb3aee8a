// CPU quantize / dequantize of the NF4 format, byte-exact with bitsandbytes.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fastpeft/nf4_codec.h"
#include "nf4_cpu_kernels.h"
#include "nf4_simd.h"

namespace fastpeft {
namespace cpu {

namespace {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// max |x|, NaN if any element is NaN (as torch's amax, which bitsandbytes uses)
template <typename T>
float block_absmax(const T* x, std::int64_t n) {
  float m = 0.0f;
  bool nan = false;
  for (std::int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(to_float(x[i]));
    nan |= a != a;
    m = std::max(m, a);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// max |x| ignoring NaN (fmax), 0 for an all-NaN block: bitsandbytes' 8-bit blockwise quantizer
float block_absmax_ignoring_nan(const float* x, std::int64_t n) {
  float m = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs(x[i]));
  return m;
}

}  // namespace

template <typename T>
void nf4_quantize(const T* weight, std::int64_t numel, std::int64_t blocksize, std::uint8_t* packed, float* absmax) {
  const std::int64_t nblocks = (numel + blocksize - 1) / blocksize;
  const std::int64_t full_blocks = numel / blocksize;
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < nblocks; ++b) {
    const std::int64_t start = b * blocksize;
    const std::int64_t len = std::min(blocksize, numel - start);
    const T* x = weight + start;
    std::uint8_t* out = packed + start / 2;  // blocksize is even: a block starts on a byte boundary
    const float amax = block_absmax(x, len);
    if (b < full_blocks) {
      absmax[b] = amax;
      const float reciprocal = 1.0f / nf4::floor_scale(amax);
      for (std::int64_t i = 0; i < len; i += 2) {
        out[i / 2] = nf4::pack(nf4::encode_in_full_block(to_float(x[i]), reciprocal),
                               nf4::encode_in_full_block(to_float(x[i + 1]), reciprocal));
      }
    } else {
      const float floored = nf4::floor_scale(amax);
      absmax[b] = floored;  // bitsandbytes stores the floored scale of the trailing block
      for (std::int64_t i = 0; i < len; i += 2) {
        const std::uint8_t even = nf4::encode_in_tail_block(to_float(x[i]), floored);
        const std::uint8_t odd = i + 1 < len ? nf4::encode_in_tail_block(to_float(x[i + 1]), floored) : nf4::kZeroCode;
        out[i / 2] = nf4::pack(even, odd);
      }
    }
  }
}

template void nf4_quantize<float>(const float*, std::int64_t, std::int64_t, std::uint8_t*, float*);
template void nf4_quantize<c10::Half>(const c10::Half*, std::int64_t, std::int64_t, std::uint8_t*, float*);
template void nf4_quantize<c10::BFloat16>(const c10::BFloat16*, std::int64_t, std::int64_t, std::uint8_t*, float*);

void dynamic_quantize(const float* values, std::int64_t n, std::int64_t blocksize, const float* code,
                      std::uint8_t* out, float* absmax) {
  // grid point -> number of code midpoints strictly below it
  std::vector<std::uint8_t> table(nf4::kDynamicGridSize);
  int below = 0;
  for (int i = 0; i < nf4::kDynamicGridSize; ++i) {
    const float g = nf4::dynamic_grid_value(i);
    while (below < 255 && 0.5f * (code[below] + code[below + 1]) < g) ++below;
    table[i] = static_cast<std::uint8_t>(below);
  }
  const std::int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < nblocks; ++b) {
    const std::int64_t start = b * blocksize;
    const std::int64_t len = std::min(blocksize, n - start);
    // Non-finite input is defined as in bitsandbytes: NaN is left out of the absmax and stores code 0;
    // an infinite absmax scales every finite value to 0 (and inf itself to NaN, code 0).
    const float amax = block_absmax_ignoring_nan(values + start, len);
    absmax[b] = amax;
    if (amax == 0.0f) {
      std::fill(out + start, out + start + len, std::uint8_t{0});
      continue;
    }
    const float reciprocal = 1.0f / amax;
    for (std::int64_t i = 0; i < len; ++i) out[start + i] = table[nf4::dynamic_grid_index(values[start + i] * reciprocal)];
  }
}

void nested_scales(const std::uint8_t* qabsmax, const float* nested_absmax, const float* code2, float offset,
                   std::int64_t nblocks, float* out) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < nblocks; ++i) {
    out[i] = nf4::nested_scale(code2[qabsmax[i]], nested_absmax[i / nf4::kNestedBlocksize], offset);
  }
}

template <typename T>
void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t numel, std::int64_t blocksize, T* out) {
  const std::int64_t nblocks = (numel + blocksize - 1) / blocksize;
#if defined(FASTPEFT_NF4_AVX2)
  const CodeTable table;
#endif
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < nblocks; ++b) {
    const std::int64_t start = b * blocksize;
    const std::int64_t len = std::min(blocksize, numel - start);
    const std::uint8_t* bytes = packed + start / 2;
    T* dst = out + start;
    std::int64_t i = 0;
#if defined(FASTPEFT_NF4_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      const __m256 s = _mm256_set1_ps(absmax[b]);
      for (; i + 8 <= len; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(table.decode8(bytes + i / 2), s));
    }
#endif
    float scaled[nf4::kNumCodes];  // code * absmax: the exact fp32 product of the format
    for (int c = 0; c < nf4::kNumCodes; ++c) scaled[c] = nf4::decode(static_cast<std::uint8_t>(c), absmax[b]);
    for (; i + 2 <= len; i += 2) {
      const std::uint8_t byte = bytes[i / 2];
      dst[i] = static_cast<T>(scaled[nf4::high_nibble(byte)]);
      dst[i + 1] = static_cast<T>(scaled[nf4::low_nibble(byte)]);
    }
    if (i < len) dst[i] = static_cast<T>(scaled[nf4::high_nibble(bytes[i / 2])]);
  }
}

template void nf4_dequantize<float>(const std::uint8_t*, const float*, std::int64_t, std::int64_t, float*);
template void nf4_dequantize<c10::Half>(const std::uint8_t*, const float*, std::int64_t, std::int64_t, c10::Half*);
template void nf4_dequantize<c10::BFloat16>(const std::uint8_t*, const float*, std::int64_t, std::int64_t,
                                            c10::BFloat16*);

void nf4_dequantize_rows_f32(const std::uint8_t* packed, const float* absmax, std::int64_t K, std::int64_t blocksize,
                             std::int64_t row_begin, std::int64_t row_end, float* out) {
  const std::int64_t blocks_per_row = K / blocksize;
#if defined(FASTPEFT_NF4_AVX2)
  const CodeTable table;
#endif
#pragma omp parallel for schedule(static)
  for (std::int64_t n = row_begin; n < row_end; ++n) {
    const std::uint8_t* row = packed + n * (K / 2);
    float* dst = out + (n - row_begin) * K;
    for (std::int64_t b = 0; b < blocks_per_row; ++b) {
      const float scale = absmax[n * blocks_per_row + b];
      const std::int64_t k0 = b * blocksize;
#if defined(FASTPEFT_NF4_AVX2)
      const __m256 s = _mm256_set1_ps(scale);
      for (std::int64_t k = k0; k < k0 + blocksize; k += 8) {
        _mm256_storeu_ps(dst + k, _mm256_mul_ps(table.decode8(row + k / 2), s));
      }
#else
      for (std::int64_t k = k0; k < k0 + blocksize; ++k) dst[k] = nf4::decode(nf4::nibble_at(row, k), scale);
#endif
    }
  }
}

bool simd_enabled() {
#if defined(FASTPEFT_NF4_AVX2)
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastpeft
