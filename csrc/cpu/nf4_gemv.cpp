// Fused NF4 dequant-GEMV kernels for a few activation rows (M <= kMaxGemvRows), fp32.
//
// Forward  y = x · dequant(W)ᵀ: threads split the N output rows into
// contiguous ranges, so each streams its own contiguous slice of the packed
// bytes; the dequantized weight never exists in memory and each weight byte
// is read once for all M rows. The activations are permuted once per call into
// the decoder's order (nf4_simd.h) instead of un-permuting decoded weights.
// - AVX-512: a step decodes 128 elements (one 64-byte load) of R rows of W at
//   once (R = 4 for one activation row: x is loaded once for four rows) into
//   registers with a shift and a `vpermps` per 16 codes, FMAs them into vector
//   accumulators, multiplies each block's partial sums by the block absmax
//   once (lanes 0-7 and 8-15 hold different blocks when blocksize is 64) and
//   reduces horizontally once per output. K % 128 == 64 ends in a half group
//   (a masked load; the padded activations are zero).
// - AVX2: 64 codes per step (byte-plane `vpshufb` lookups), one row of W at a time.
// - otherwise: the scalar codec of nf4_codec.h.
// Backward dx = dy · dequant(W): threads split N as well and each keeps a
// private dx partial [M, K] (small, cache resident, in decoder order); the
// partials are summed and un-permuted at the end. Rows of W are streamed
// contiguously either way. K must be a multiple of the blocksize (>= 64).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
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

#if defined(FASTPEFT_NF4_AVX512)
// Software prefetch along a row of W: into L1 16 steps ahead, into L2 256 steps ahead. Measured at M = 1, one
// thread: 4096² 10% faster than the hardware prefetcher alone (W in the 300 MiB L3 of the test machine),
// 14336x4096 (W 29 MiB) 4.1 -> 2.5 ms, which leaves the kernel compute-bound there too.
constexpr int kPrefetchBytes = 1024;
constexpr int kPrefetchL2Bytes = 16384;

// Prefetches for the step at `bytes`; the addresses may lie past the end of W (a prefetch never faults), so
// they are formed as integers, not as out-of-bounds pointers.
inline void prefetch_ahead(const std::uint8_t* bytes) {
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(bytes);
  _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchBytes), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchL2Bytes), _MM_HINT_T1);
}

// Activations in CodeTable512 order: rows of Kp = K rounded up to 128 floats, 64-byte aligned, zero padded.
class PermutedActivations {
 public:
  PermutedActivations(const float* x, std::int64_t ldx, int rows, std::int64_t K)
      : stride_((K + kGroup128 - 1) / kGroup128 * kGroup128), storage_(static_cast<std::size_t>(rows) * stride_ + 16) {
    data_ = storage_.data() + (16 - reinterpret_cast<std::uintptr_t>(storage_.data()) / sizeof(float) % 16) % 16;
    __m512i element[8];  // offsets within a group read into vector s
    for (int s = 0; s < 8; ++s) {
      alignas(64) std::int32_t e[16];
      for (int lane = 0; lane < 16; ++lane) e[lane] = group128_element(s, lane);
      element[s] = _mm512_load_si512(e);
    }
    for (int m = 0; m < rows; ++m) {
      float* dst = data_ + m * stride_;
      const float* src = x + m * ldx;
      for (std::int64_t g = 0; g < stride_; g += kGroup128) {
        // lanes 8-15 of a trailing half group lie past K: not read, zero
        const __mmask16 inside = g + kGroup128 <= K ? 0xFFFF : 0x00FF;
        for (int s = 0; s < 8; ++s)
          _mm512_store_ps(dst + g + 16 * s,
                          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, element[s], src + g, sizeof(float)));
      }
    }
  }
  const float* row(int m) const { return data_ + m * stride_; }

 private:
  std::int64_t stride_;
  std::vector<float> storage_;
  float* data_;
};

// out[m][r] = x[m] · dequant(W row n0 + r) for MC activation rows and R consecutive rows of W.
template <int MC, int R>
inline void dot_rows_avx512(const PermutedActivations& xp, const CodeTable512& table, const std::uint8_t* packed,
                            const float* absmax, std::int64_t K, std::int64_t blocksize, std::int64_t n0,
                            float (&out)[MC][R]) {
  constexpr int C = MC * R >= 4 ? 1 : 2;  // independent FMA chains per accumulator
  const std::int64_t blocks_per_row = K / blocksize;
  const std::uint8_t* row[R];
  const float* scales[R];
  for (int r = 0; r < R; ++r) {
    row[r] = packed + (n0 + r) * (K / 2);
    scales[r] = absmax + (n0 + r) * blocks_per_row;
  }
  const float* xr[MC];
  for (int m = 0; m < MC; ++m) xr[m] = xp.row(m);
  __m512 total[MC][R];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) total[m][r] = _mm512_setzero_ps();
  // A span shares its scales: one block, or two 64-element blocks (lanes 0-7, 8-15).
  const std::int64_t span = blocksize < kGroup128 ? kGroup128 : blocksize;
  for (std::int64_t k0 = 0; k0 < K; k0 += span) {
    const std::int64_t k1 = k0 + span < K ? k0 + span : K;
    __m512 part[MC][R][C];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) part[m][r][c] = _mm512_setzero_ps();
    for (std::int64_t k = k0; k < k1; k += kGroup128) {
      __m512i words[R];
      if (k + kGroup128 <= K) {
        for (int r = 0; r < R; ++r) prefetch_ahead(row[r] + k / 2);
        for (int r = 0; r < R; ++r) words[r] = _mm512_loadu_si512(row[r] + k / 2);
      } else {  // the last 64 elements: codes in lanes 0-7, lanes 8-15 meet zero activations
        for (int r = 0; r < R; ++r) words[r] = _mm512_maskz_loadu_epi32(0x00FF, row[r] + k / 2);
      }
      const auto step = [&](auto s_tag) {
        constexpr int s = decltype(s_tag)::value;
        __m512 xs[MC];
        for (int m = 0; m < MC; ++m) xs[m] = _mm512_load_ps(xr[m] + k + 16 * s);
        for (int r = 0; r < R; ++r) {
          const __m512 c = table.nibble<s>(words[r]);
          for (int m = 0; m < MC; ++m) part[m][r][s % C] = _mm512_fmadd_ps(c, xs[m], part[m][r][s % C]);
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
      step(std::integral_constant<int, 4>{});
      step(std::integral_constant<int, 5>{});
      step(std::integral_constant<int, 6>{});
      step(std::integral_constant<int, 7>{});
    }
    for (int r = 0; r < R; ++r) {
      __m512 s;
      if (blocksize >= kGroup128) {
        s = _mm512_set1_ps(scales[r][k0 / blocksize]);
      } else {  // blocksize 64: the second block is absent in a trailing half group (its lanes sum to 0)
        const float second = k0 + 64 < K ? scales[r][k0 / 64 + 1] : 0.0f;
        s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(scales[r][k0 / 64]), _mm512_set1_ps(second));
      }
      for (int m = 0; m < MC; ++m) {
        __m512 sum = part[m][r][0];
        for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, part[m][r][c]);
        total[m][r] = _mm512_fmadd_ps(sum, s, total[m][r]);
      }
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < R; ++r) out[m][r] = _mm512_reduce_add_ps(total[m][r]);
}

// Rows of W decoded together per step for MC activation rows (measured, 4096², one thread: for one
// activation row, one stream of W with prefetching beat 2 and 4 rows at a time by 10-25%).
constexpr int rows_of_w_per_step(int MC) { return MC == 1 ? 1 : (MC <= 3 ? 2 : 1); }

template <int MC>
void gemv_pass_avx512(const float* x, std::int64_t ldx, const std::uint8_t* packed, const float* absmax,
                      std::int64_t N, std::int64_t K, std::int64_t blocksize, const float* bias, float* y,
                      std::int64_t ldy) {
  constexpr int R = rows_of_w_per_step(MC);
  const CodeTable512 table;
  const PermutedActivations xp(x, ldx, MC, K);
  const auto store = [&](std::int64_t n0, auto& out, int rows) {
    for (int r = 0; r < rows; ++r) {
      const float b = bias != nullptr ? bias[n0 + r] : 0.0f;
      for (int m = 0; m < MC; ++m) y[m * ldy + n0 + r] = out[m][r] + b;
    }
  };
  const std::int64_t steps = N / R;
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (std::int64_t i = 0; i < steps; ++i) {
      float out[MC][R];
      dot_rows_avx512<MC, R>(xp, table, packed, absmax, K, blocksize, i * R, out);
      store(i * R, out, R);
    }
#pragma omp for schedule(static)
    for (std::int64_t n = steps * R; n < N; ++n) {
      float out[MC][1];
      dot_rows_avx512<MC, 1>(xp, table, packed, absmax, K, blocksize, n, out);
      store(n, out, 1);
    }
  }
}
#endif

template <int MC>
void gemv_pass(const float* x, std::int64_t ldx, const std::uint8_t* packed, const float* absmax, std::int64_t N,
               std::int64_t K, std::int64_t blocksize, const float* bias, float* y, std::int64_t ldy) {
#if defined(FASTPEFT_NF4_AVX512)
  gemv_pass_avx512<MC>(x, ldx, packed, absmax, N, K, blocksize, bias, y, ldy);
#else
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
#endif
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
