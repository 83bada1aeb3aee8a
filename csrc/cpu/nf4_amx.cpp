// Fused NF4 x bf16 GEMM on AMX tiles: y = x · dequant(W)ᵀ without materialising W (see nf4_bf16_kernels.h).
//
// Computed as yᵀ = W · xᵀ, so that rows of W are AMX "A" rows and need no transpose:
// - x (bf16, [M, K]) is rearranged once per call into VNNI "B" tiles: for each 16 rows of x and each 32
//   columns, a contiguous 1 KiB tile whose row p holds (x[m][2p], x[m][2p+1]) for 16 m. Rows past M are 0.
// - threads split W into blocks of 32 rows; a block is decoded to bf16 (the exact format values, as
//   nf4_dequantize_tile_bf16) into a thread-local buffer laid out as [K/32][32 rows][32] (one 2 KiB slab
//   per 32 columns: the two A tiles of a k step are contiguous, no 4 KiB-stride aliasing), 128 KiB at
//   K = 2048, which stays in L2 while every 32 rows of x pass over it;
// - per (32 rows of W, 32 rows of x): four fp32 accumulator tiles, 2 A + 2 B tile loads and 4 TDPBF16PS
//   per 32 columns of K; the tiles are stored, bias added, rounded to bf16 and written transposed into y.
// Products are exact and accumulate in fp32 (AMX flushes bf16 subnormal inputs to zero).
#include <algorithm>
#include <vector>

#include "fastpeft/nf4_codec.h"
#include "nf4_bf16_kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__linux__)
#define FASTPEFT_NF4_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastpeft {
namespace cpu {

#if defined(FASTPEFT_NF4_AMX)
namespace {

constexpr int kTileRows = 16;     // rows of every tile
constexpr int kTileK = 32;        // bf16 elements per tile row (64 bytes)
constexpr int kBlockRows = 32;    // rows of W (and of x) per register block: 2 tiles

struct alignas(64) TileConfig {
  std::uint8_t palette_id = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

// bf16 bits of 16 fp32 values, round to nearest even, NaN -> 0x7FC0 (as nf4_bf16.cpp).
inline __m256i round_to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
}

// In-register transpose of a 16 x 16 matrix of 32-bit words: r[i] holds row i on entry, column i on exit.
inline void transpose16x16(__m512i* r) {
  __m512i t[16], s[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // s[4i + e], lane L: rows 4i..4i+3 of column 4L + e
    s[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    s[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i u0 = _mm512_shuffle_i32x4(s[e], s[4 + e], 0x88), u1 = _mm512_shuffle_i32x4(s[e], s[4 + e], 0xdd);
    const __m512i v0 = _mm512_shuffle_i32x4(s[8 + e], s[12 + e], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(s[8 + e], s[12 + e], 0xdd);
    r[e] = _mm512_shuffle_i32x4(u0, v0, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(u0, v0, 0xdd);
    r[4 + e] = _mm512_shuffle_i32x4(u1, v1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(u1, v1, 0xdd);
  }
}

// Rows [n0, n0 + 32) of W decoded into slab layout [K/32][32][32] (rows >= N are zero).
void decode_block(const std::uint8_t* packed, const float* absmax, std::int64_t N, std::int64_t K,
                  std::int64_t blocksize, std::int64_t n0, const __m512 codes, std::uint16_t* buf) {
  const __m512i low_nibble = _mm512_set1_epi32(0x0F);
  for (int r = 0; r < kBlockRows; ++r) {
    const std::int64_t n = n0 + r;
    std::uint16_t* dst = buf + r * kTileK;
    if (n >= N) {
      for (std::int64_t k = 0; k < K; k += kTileK) _mm512_storeu_si512(dst + k * kBlockRows, _mm512_setzero_si512());
      continue;
    }
    const std::uint8_t* row = packed + n * (K / 2);
    const float* scales = absmax + n * (K / blocksize);
    for (std::int64_t k0 = 0; k0 < K; k0 += blocksize) {
      const __m512i table =
          _mm512_castsi256_si512(round_to_bf16_bits(_mm512_mul_ps(codes, _mm512_set1_ps(scales[k0 / blocksize]))));
      for (std::int64_t k = k0; k < k0 + blocksize; k += kTileK) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, low_nibble), 16));
        _mm512_storeu_si512(dst + k * kBlockRows, _mm512_permutexvar_epi16(idx, table));
      }
    }
  }
}

}  // namespace

bool amx_bf16_available() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

void nf4_matmul_bf16_amx(const c10::BFloat16* x, std::int64_t M, const std::uint8_t* packed, const float* absmax,
                         std::int64_t N, std::int64_t K, std::int64_t blocksize, const c10::BFloat16* bias,
                         c10::BFloat16* y) {
  const std::int64_t m_blocks = (M + kBlockRows - 1) / kBlockRows;
  const std::int64_t m_tiles = m_blocks * 2;
  const std::int64_t k_steps = K / kTileK;
  // x in VNNI B tiles: tile (mt, ks) at xv + (mt * k_steps + ks) * 256 dwords, row p = k pair, lane = m
  std::vector<std::uint32_t> xv(static_cast<std::size_t>(m_tiles) * k_steps * 256);
  const auto* x32 = reinterpret_cast<const std::uint32_t*>(x);
#pragma omp parallel for schedule(static)
  for (std::int64_t mt = 0; mt < m_tiles; ++mt) {
    for (std::int64_t ks = 0; ks < k_steps; ++ks) {
      __m512i r[16];
      for (int j = 0; j < kTileRows; ++j) {
        const std::int64_t m = mt * kTileRows + j;
        r[j] = m < M ? _mm512_loadu_si512(x32 + m * (K / 2) + ks * 16) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      std::uint32_t* tile = xv.data() + (mt * k_steps + ks) * 256;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(tile + p * 16, r[p]);
    }
  }
  alignas(64) float codes_array[16];
  for (int i = 0; i < 16; ++i) codes_array[i] = nf4::code_value(i);
  const std::int64_t n_blocks = (N + kBlockRows - 1) / kBlockRows;
#pragma omp parallel
  {
    configure_tiles();
    const __m512 codes = _mm512_load_ps(codes_array);
    std::vector<std::uint16_t> wbuf(static_cast<std::size_t>(kBlockRows) * K);
    alignas(64) float c[4][kTileRows][16];
#pragma omp for schedule(static)
    for (std::int64_t nb = 0; nb < n_blocks; ++nb) {
      const std::int64_t n0 = nb * kBlockRows;
      decode_block(packed, absmax, N, K, blocksize, n0, codes, wbuf.data());
      for (std::int64_t mb = 0; mb < m_blocks; ++mb) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        const std::uint32_t* b0 = xv.data() + (2 * mb) * k_steps * 256;
        const std::uint32_t* b1 = b0 + k_steps * 256;
        for (std::int64_t ks = 0; ks < k_steps; ++ks) {
          const std::uint16_t* a = wbuf.data() + ks * kBlockRows * kTileK;
          _tile_loadd(0, a, 64);
          _tile_loadd(1, a + kTileRows * kTileK, 64);
          _tile_loadd(2, b0 + ks * 256, 64);
          _tile_loadd(3, b1 + ks * 256, 64);
          _tile_dpbf16ps(4, 0, 2);  // W rows 0-15  x  x rows 0-15
          _tile_dpbf16ps(5, 0, 3);  // W rows 0-15  x  x rows 16-31
          _tile_dpbf16ps(6, 1, 2);  // W rows 16-31 x  x rows 0-15
          _tile_dpbf16ps(7, 1, 3);  // W rows 16-31 x  x rows 16-31
        }
        _tile_stored(4, c[0], 64);
        _tile_stored(5, c[1], 64);
        _tile_stored(6, c[2], 64);
        _tile_stored(7, c[3], 64);
        for (int t = 0; t < 4; ++t) {  // c[t][i][j] = y[m_base + j][n_base + i]: transpose, then store rows of y
          const std::int64_t n_base = n0 + (t / 2) * kTileRows, m_base = mb * kBlockRows + (t % 2) * kTileRows;
          if (n_base >= N || m_base >= M) continue;
          const __mmask16 valid = static_cast<__mmask16>(N - n_base >= 16 ? 0xFFFF : (1u << (N - n_base)) - 1);
          __m512 b = _mm512_setzero_ps();
          if (bias != nullptr) {
            const __m256i raw = _mm256_maskz_loadu_epi16(valid, bias + n_base);
            b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
          }
          __m512i r[16];
          for (int i = 0; i < kTileRows; ++i) r[i] = _mm512_load_si512(c[t][i]);
          transpose16x16(r);
          for (int j = 0; j < kTileRows && m_base + j < M; ++j) {
            const __m256i out = round_to_bf16_bits(_mm512_add_ps(_mm512_castsi512_ps(r[j]), b));
            _mm256_mask_storeu_epi16(y + (m_base + j) * N + n_base, valid, out);
          }
        }
      }
    }
    _tile_release();
  }
}

// dx = dy · dequant(W) on AMX tiles: C tiles are rows of dx (m) x 16 columns (k); A tiles come from dy
// (repacked once into contiguous, zero-padded 16 x 32 tiles), B tiles from W in VNNI form: threads split
// K into blocks of 32 columns, and a block's column slice of W (all N rows) is decoded into pairs of rows
// interleaved element by element, (W[2p][k], W[2p+1][k]) for 16 k per tile row (128 KiB at N = 2048).
void nf4_matmul_transposed_bf16_amx(const c10::BFloat16* dy, std::int64_t M, const std::uint8_t* packed,
                                    const float* absmax, std::int64_t N, std::int64_t K, std::int64_t blocksize,
                                    c10::BFloat16* dx) {
  const std::int64_t m_blocks = (M + kBlockRows - 1) / kBlockRows;
  const std::int64_t m_tiles = m_blocks * 2;
  const std::int64_t n_chunks = (N + kTileK - 1) / kTileK;
  // dy tiles: tile (mt, nc) at dyp + (mt * n_chunks + nc) * 512 words, 16 rows of 32 n
  std::vector<std::uint16_t> dyp(static_cast<std::size_t>(m_tiles) * n_chunks * 512);
  const auto* g = reinterpret_cast<const std::uint16_t*>(dy);
#pragma omp parallel for schedule(static)
  for (std::int64_t mt = 0; mt < m_tiles; ++mt) {
    for (std::int64_t nc = 0; nc < n_chunks; ++nc) {
      std::uint16_t* tile = dyp.data() + (mt * n_chunks + nc) * 512;
      const std::int64_t n0 = nc * kTileK;
      const __mmask32 valid = static_cast<__mmask32>(N - n0 >= 32 ? 0xFFFFFFFFu : (1u << (N - n0)) - 1);
      for (int j = 0; j < kTileRows; ++j) {
        const std::int64_t m = mt * kTileRows + j;
        const __m512i row = m < M ? _mm512_maskz_loadu_epi16(valid, g + m * N + n0) : _mm512_setzero_si512();
        _mm512_storeu_si512(tile + j * kTileK, row);
      }
    }
  }
  alignas(64) float codes_array[16];
  for (int i = 0; i < 16; ++i) codes_array[i] = nf4::code_value(i);
  alignas(64) std::uint16_t even_lo[32], even_hi[32];
  for (int i = 0; i < 16; ++i) {  // (a, b) -> a0 b0 a1 b1 ... for k 0..15, and for k 16..31
    even_lo[2 * i] = static_cast<std::uint16_t>(i);
    even_lo[2 * i + 1] = static_cast<std::uint16_t>(32 + i);
    even_hi[2 * i] = static_cast<std::uint16_t>(16 + i);
    even_hi[2 * i + 1] = static_cast<std::uint16_t>(48 + i);
  }
  const std::int64_t k_blocks = K / kTileK;
  const std::int64_t blocks_per_row = K / blocksize;
#pragma omp parallel
  {
    configure_tiles();
    const __m512 codes = _mm512_load_ps(codes_array);
    const __m512i low_nibble = _mm512_set1_epi32(0x0F);
    const __m512i lo_idx = _mm512_load_si512(even_lo), hi_idx = _mm512_load_si512(even_hi);
    // B tiles: chunk nc at wbuf + nc * 1024 words: tile for k 0..15, then tile for k 16..31
    std::vector<std::uint16_t> wbuf(static_cast<std::size_t>(n_chunks) * 1024);
    alignas(64) float c[4][kTileRows][16];
#pragma omp for schedule(static)
    for (std::int64_t kb = 0; kb < k_blocks; ++kb) {
      const std::int64_t k0 = kb * kTileK;
      auto decode_row = [&](std::int64_t n) -> __m512i {
        if (n >= N) return _mm512_setzero_si512();
        const __m512i table = _mm512_castsi256_si512(
            round_to_bf16_bits(_mm512_mul_ps(codes, _mm512_set1_ps(absmax[n * blocks_per_row + k0 / blocksize]))));
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + n * (K / 2) + k0 / 2)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, low_nibble), 16));
        return _mm512_permutexvar_epi16(idx, table);
      };
      for (std::int64_t p = 0; p < n_chunks * 16; ++p) {  // pair p: rows 2p, 2p + 1
        const __m512i a = decode_row(2 * p), b = decode_row(2 * p + 1);
        std::uint16_t* dst = wbuf.data() + (p / 16) * 1024 + (p % 16) * kTileK;
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo_idx, b));
        _mm512_storeu_si512(dst + 512, _mm512_permutex2var_epi16(a, hi_idx, b));
      }
      for (std::int64_t mb = 0; mb < m_blocks; ++mb) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        const std::uint16_t* a0 = dyp.data() + (2 * mb) * n_chunks * 512;
        const std::uint16_t* a1 = a0 + n_chunks * 512;
        for (std::int64_t nc = 0; nc < n_chunks; ++nc) {
          const std::uint16_t* b = wbuf.data() + nc * 1024;
          _tile_loadd(0, a0 + nc * 512, 64);
          _tile_loadd(1, a1 + nc * 512, 64);
          _tile_loadd(2, b, 64);
          _tile_loadd(3, b + 512, 64);
          _tile_dpbf16ps(4, 0, 2);  // dy rows 0-15  x  k 0-15
          _tile_dpbf16ps(5, 0, 3);  // dy rows 0-15  x  k 16-31
          _tile_dpbf16ps(6, 1, 2);  // dy rows 16-31 x  k 0-15
          _tile_dpbf16ps(7, 1, 3);  // dy rows 16-31 x  k 16-31
        }
        _tile_stored(4, c[0], 64);
        _tile_stored(5, c[1], 64);
        _tile_stored(6, c[2], 64);
        _tile_stored(7, c[3], 64);
        for (int t = 0; t < 4; ++t) {
          const std::int64_t m_base = mb * kBlockRows + (t / 2) * kTileRows, k_base = k0 + (t % 2) * kTileRows;
          for (int i = 0; i < kTileRows && m_base + i < M; ++i)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dx + (m_base + i) * K + k_base),
                                round_to_bf16_bits(_mm512_load_ps(c[t][i])));
        }
      }
    }
    _tile_release();
  }
}
#else
bool amx_bf16_available() { return false; }

void nf4_matmul_transposed_bf16_amx(const c10::BFloat16*, std::int64_t, const std::uint8_t*, const float*,
                                    std::int64_t, std::int64_t, std::int64_t, c10::BFloat16*) {}

void nf4_matmul_bf16_amx(const c10::BFloat16*, std::int64_t, const std::uint8_t*, const float*, std::int64_t,
                         std::int64_t, std::int64_t, const c10::BFloat16*, c10::BFloat16*) {}
#endif

}  // namespace cpu
}  // namespace fastpeft
