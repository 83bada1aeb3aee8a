// Fused NF4 dequant-GEMV kernels for a few activation rows (M <= kMaxGemvRows), fp32.
//
// Forward  y = x · dequant(W)ᵀ: threads split the N output rows; a row of W is
// decoded 64 codes at a time (nf4_simd.h), dotted with the activations (which
// were permuted once into the decoder's order), and each block's partial dot
// product is multiplied by the block absmax once. Each weight byte is read
// once for all M rows; the dequantized weight never exists in memory.
// Backward dx = dy · dequant(W): threads split N as well and each keeps a
// private dx partial [M, K] (small, cache resident, in decoder order); the
// partials are summed and un-permuted at the end. Rows of W are streamed
// contiguously either way. K must be a multiple of the blocksize (>= 64).
#include <omp.h>

#include <algorithm>
#include <vector>

#include "fastpeft/nf4_codec.h"
#include "nf4_cpu_kernels.h"
#include "nf4_simd.h"

namespace fastpeft {
namespace cpu {

namespace {

constexpr int kRowsPerPass = 8;            // activation rows sharing one decode of W (forward)
constexpr int kTransposedRowsPerPass = 4;  // rows of dy per pass: the per-thread partial stays in L1
constexpr int kGroup = 64;       // elements per decode64; every block (>= 64, power of two) is whole groups

#if defined(FASTPEFT_NF4_AVX2)
// Element offset (within its 64-group) of position p = 8 * vec + lane of decode64's output.
struct GroupOrder {
  int element[kGroup];
  GroupOrder() {
    for (int v = 0; v < 8; ++v)
      for (int l = 0; l < 8; ++l) element[8 * v + l] = decode64_position(v, l);
  }
};

// src [rows, K] (row stride ld) -> dst [rows, K] contiguous in decode64 order.
void to_group_order(const float* src, std::int64_t ld, std::int64_t rows, std::int64_t K, float* dst) {
  const GroupOrder order;
  for (std::int64_t m = 0; m < rows; ++m)
    for (std::int64_t g = 0; g < K; g += kGroup)
      for (int p = 0; p < kGroup; ++p) dst[m * K + g + p] = src[m * ld + g + order.element[p]];
}
#endif

template <int MC>
void gemv_pass(const float* x, std::int64_t ldx, const std::uint8_t* packed, const float* absmax, std::int64_t N,
               std::int64_t K, std::int64_t blocksize, const float* bias, float* y, std::int64_t ldy) {
  const std::int64_t blocks_per_row = K / blocksize;
#if defined(FASTPEFT_NF4_AVX2)
  const CodeTable table;
  std::vector<float> xp_storage(static_cast<std::size_t>(MC) * K);
  float* xp = xp_storage.data();
  to_group_order(x, ldx, MC, K, xp);
  constexpr int P = MC == 1 ? 4 : (MC == 2 ? 2 : 1);  // independent FMA chains per activation row
#endif
#pragma omp parallel for schedule(static)
  for (std::int64_t n = 0; n < N; ++n) {
    const std::uint8_t* row = packed + n * (K / 2);
    const float* scales = absmax + n * blocks_per_row;
    float out[MC];
#if defined(FASTPEFT_NF4_AVX2)
    __m256 total[MC];
    for (int m = 0; m < MC; ++m) total[m] = _mm256_setzero_ps();
    for (std::int64_t b = 0; b < blocks_per_row; ++b) {
      __m256 part[MC][P];
      for (int m = 0; m < MC; ++m)
        for (int p = 0; p < P; ++p) part[m][p] = _mm256_setzero_ps();
      const std::int64_t k_end = (b + 1) * blocksize;
      for (std::int64_t k = b * blocksize; k < k_end; k += kGroup) {
        // decode64 in its two halves (even, then odd elements) to keep 4 code vectors live, not 8
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2));
        for (int half = 0; half < 2; ++half) {
          const __m256i idx = half == 0 ? _mm256_and_si256(_mm256_srli_epi16(bytes, 4), table.low_nibbles)
                                        : _mm256_and_si256(bytes, table.low_nibbles);
          __m256 c[4];
          table.decode32(idx, c);
          for (int q = 0; q < 4; ++q) {
            const int v = 4 * half + q;
            for (int m = 0; m < MC; ++m)
              part[m][v % P] = _mm256_fmadd_ps(c[q], _mm256_loadu_ps(xp + m * K + k + 8 * v), part[m][v % P]);
          }
        }
      }
      // the block scale multiplies the block's partial dot product once
      const __m256 s = _mm256_set1_ps(scales[b]);
      for (int m = 0; m < MC; ++m) {
        __m256 sum = part[m][0];
        for (int p = 1; p < P; ++p) sum = _mm256_add_ps(sum, part[m][p]);
        total[m] = _mm256_fmadd_ps(sum, s, total[m]);
      }
    }
    for (int m = 0; m < MC; ++m) out[m] = hsum(total[m]);
#else
    for (int m = 0; m < MC; ++m) out[m] = 0.0f;
    for (std::int64_t k = 0; k < K; ++k) {
      const float w = nf4::decode(nf4::nibble_at(row, k), scales[k / blocksize]);
      for (int m = 0; m < MC; ++m) out[m] += w * x[m * ldx + k];
    }
#endif
    const float b = bias != nullptr ? bias[n] : 0.0f;
    for (int m = 0; m < MC; ++m) y[m * ldy + n] = out[m] + b;
  }
}

template <int MC>
void gemv_transposed_pass(const float* dy, std::int64_t lddy, const std::uint8_t* packed, const float* absmax,
                          std::int64_t N, std::int64_t K, std::int64_t blocksize, float* dx, std::int64_t lddx) {
  const std::int64_t blocks_per_row = K / blocksize;
  const int threads = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(N)));
  // per-thread partial dx; with AVX2 its columns are in decode64 order within each 64-group
  std::vector<float> partial(static_cast<std::size_t>(threads) * MC * K, 0.0f);
#if defined(FASTPEFT_NF4_AVX2)
  const CodeTable table;
  const GroupOrder order;
#endif
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    float* acc = partial.data() + static_cast<std::size_t>(t) * MC * K;
    const std::int64_t n_begin = N * t / nt, n_end = N * (t + 1) / nt;
    for (std::int64_t n = n_begin; n < n_end; ++n) {
      const std::uint8_t* row = packed + n * (K / 2);
      const float* scales = absmax + n * blocks_per_row;
#if defined(FASTPEFT_NF4_AVX2)
      for (std::int64_t b = 0; b < blocks_per_row; ++b) {
        __m256 g[MC];
        for (int m = 0; m < MC; ++m) g[m] = _mm256_set1_ps(dy[m * lddy + n] * scales[b]);
        const std::int64_t k_end = (b + 1) * blocksize;
        for (std::int64_t k = b * blocksize; k < k_end; k += kGroup) {
          __m256 c[8];
          table.decode64(row + k / 2, c);
          for (int v = 0; v < 8; ++v)
            for (int m = 0; m < MC; ++m) {
              float* a = acc + m * K + k + 8 * v;
              _mm256_storeu_ps(a, _mm256_fmadd_ps(c[v], g[m], _mm256_loadu_ps(a)));
            }
        }
      }
#else
      for (std::int64_t k = 0; k < K; ++k) {
        const float w = nf4::decode(nf4::nibble_at(row, k), scales[k / blocksize]);
        for (int m = 0; m < MC; ++m) acc[m * K + k] += w * dy[m * lddy + n];
      }
#endif
    }
#pragma omp barrier
    // sum the per-thread partials; each thread owns a slice of whole 64-groups of K
    const std::int64_t groups = K / kGroup;
    const std::int64_t k_begin = groups * t / nt * kGroup, k_end = groups * (t + 1) / nt * kGroup;
    for (int m = 0; m < MC; ++m) {
      for (std::int64_t k = k_begin; k < k_end; ++k) {
        float s = 0.0f;
        for (int p = 0; p < nt; ++p) s += partial[(static_cast<std::size_t>(p) * MC + m) * K + k];
#if defined(FASTPEFT_NF4_AVX2)
        const std::int64_t g0 = k - k % kGroup;
        dx[m * lddx + g0 + order.element[k - g0]] = s;
#else
        dx[m * lddx + k] = s;
#endif
      }
    }
  }
}

template <typename Pass>
void in_passes(std::int64_t M, std::int64_t rows_per_pass, Pass&& pass) {
  for (std::int64_t m0 = 0; m0 < M; m0 += rows_per_pass) pass(m0, std::min<std::int64_t>(rows_per_pass, M - m0));
}

}  // namespace

void nf4_gemv(const float* x, std::int64_t M, const std::uint8_t* packed, const float* absmax, std::int64_t N,
              std::int64_t K, std::int64_t blocksize, const float* bias, float* y) {
  in_passes(M, kRowsPerPass, [&](std::int64_t m0, std::int64_t rows) {
    const float* xs = x + m0 * K;
    float* ys = y + m0 * N;
    switch (rows) {
      case 1: gemv_pass<1>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
      case 2: gemv_pass<2>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
      case 3: gemv_pass<3>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
      case 4: gemv_pass<4>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
      case 5: gemv_pass<5>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
      case 6: gemv_pass<6>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
      case 7: gemv_pass<7>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
      default: gemv_pass<8>(xs, K, packed, absmax, N, K, blocksize, bias, ys, N); break;
    }
  });
}

void nf4_gemv_transposed(const float* dy, std::int64_t M, const std::uint8_t* packed, const float* absmax,
                         std::int64_t N, std::int64_t K, std::int64_t blocksize, float* dx) {
  in_passes(M, kTransposedRowsPerPass, [&](std::int64_t m0, std::int64_t rows) {
    const float* gs = dy + m0 * N;
    float* xs = dx + m0 * K;
    switch (rows) {
      case 1: gemv_transposed_pass<1>(gs, N, packed, absmax, N, K, blocksize, xs, K); break;
      case 2: gemv_transposed_pass<2>(gs, N, packed, absmax, N, K, blocksize, xs, K); break;
      case 3: gemv_transposed_pass<3>(gs, N, packed, absmax, N, K, blocksize, xs, K); break;
      default: gemv_transposed_pass<4>(gs, N, packed, absmax, N, K, blocksize, xs, K); break;
    }
  });
}

}  // namespace cpu
}  // namespace fastpeft
