// AVX2 decoding of NF4 codes.
//
// decode8: eight elements (four packed bytes) in element order. The 16-entry
// code table lives in two 8-lane registers; `vpermps` picks by the low three
// bits of each index and the index's bit 3 (moved to the sign bit) selects the
// table half. The indices come from one 32-bit load shifted per lane.
//
// decode64: 64 elements (32 packed bytes) into eight vectors, in a fixed
// permuted order (see `decode64_position`). Each of the four bytes of the fp32
// code values is looked up with one `vpshufb` (a 16-entry byte table per
// 128-bit lane) and the byte planes are interleaved back into floats: 12
// shuffles per 32 elements instead of 2 permutes + blend per 8. Callers permute
// the activations once to the same order instead of un-permuting the weights.
// Without AVX2 this header provides nothing and callers use the scalar codec.
//
// With AVX-512F, CodeTable512 decodes 128 elements (64 packed bytes, one
// 512-bit load) into eight 16-lane vectors: vector s holds nibble s of each
// 32-bit word, found by shifting the words right by 4s and one `vpermps` over
// the 16 code values (vpermps reads only the low four bits of each index, so
// no mask is needed): 2 instructions per 16 elements. The order is fixed (see
// `group128_element`); callers permute the activations once to match.
#pragma once

#if defined(__AVX512F__) && defined(__FMA__)
#define FASTPEFT_NF4_AVX512 1
#include <immintrin.h>

#include "fastpeft/nf4_codec.h"

namespace fastpeft {
namespace cpu {

constexpr int kGroup128 = 128;  // elements per CodeTable512 decode

struct CodeTable512 {
  __m512 codes;  // lane i = code value i

  CodeTable512() {
    alignas(64) float t[16];
    for (int i = 0; i < 16; ++i) t[i] = nf4::code_value(i);
    codes = _mm512_load_ps(t);
  }

  // Code values of nibble S (bits 4S..4S+3) of each of the 16 words.
  template <int S>
  inline __m512 nibble(__m512i words) const {
    return _mm512_permutexvar_ps(S == 0 ? words : _mm512_srli_epi32(words, 4 * S), codes);
  }
};

// Element (0..127, within a 128-element group) that CodeTable512::nibble<s> puts in lane `lane`:
// word `lane` holds bytes 4·lane..4·lane+3; nibble 2b+1 is the high nibble of byte b (the even
// element 2·(4·lane+b)), nibble 2b its low nibble (the odd element after it).
constexpr int group128_element(int s, int lane) { return 8 * lane + 2 * (s >> 1) + ((s & 1) ? 0 : 1); }

}  // namespace cpu
}  // namespace fastpeft
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define FASTPEFT_NF4_AVX2 1
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "fastpeft/nf4_codec.h"

namespace fastpeft {
namespace cpu {

struct CodeTable {
  __m256 low;    // codes 0..7
  __m256 high;   // codes 8..15
  __m256i shifts;
  __m256i byte_plane[4];  // byte t of each code value, the same 16 bytes in both lanes
  __m256i low_nibbles;

  CodeTable() {
    alignas(32) float lo[8], hi[8];
    for (int i = 0; i < 8; ++i) {
      lo[i] = nf4::code_value(i);
      hi[i] = nf4::code_value(i + 8);
    }
    low = _mm256_load_ps(lo);
    high = _mm256_load_ps(hi);
    // byte j of the little-endian word holds elements 2j (bits 8j+4..) and 2j+1 (bits 8j..)
    shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    for (int t = 0; t < 4; ++t) {
      alignas(16) std::uint8_t plane[16];
      for (int i = 0; i < 16; ++i) {
        const float c = nf4::code_value(i);
        std::uint32_t bits;
        std::memcpy(&bits, &c, sizeof(bits));
        plane[i] = static_cast<std::uint8_t>(bits >> (8 * t));
      }
      byte_plane[t] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(plane)));
    }
    low_nibbles = _mm256_set1_epi8(0x0F);
  }

  // Codes of 32 byte-indices into 4 vectors: out[q] holds indices 4q..4q+3 then 16+4q..16+4q+3.
  inline void decode32(__m256i idx, __m256* out) const {
    const __m256i b0 = _mm256_shuffle_epi8(byte_plane[0], idx);
    const __m256i b1 = _mm256_shuffle_epi8(byte_plane[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(byte_plane[2], idx);
    const __m256i b3 = _mm256_shuffle_epi8(byte_plane[3], idx);
    const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
  }

  // Codes of the 64 elements in bytes[0..31]: out[0..3] even elements, out[4..7] odd ones.
  inline void decode64(const std::uint8_t* bytes, __m256* out) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
    decode32(_mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles), out);
    decode32(_mm256_and_si256(v, low_nibbles), out + 4);
  }

  // Code values of the 8 elements stored in bytes[0..3].
  inline __m256 decode8(const std::uint8_t* bytes) const {
    std::uint32_t word;
    std::memcpy(&word, bytes, sizeof(word));
    const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
    const __m256 from_low = _mm256_permutevar8x32_ps(low, idx);
    const __m256 from_high = _mm256_permutevar8x32_ps(high, idx);
    const __m256 use_high = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(from_low, from_high, use_high);
  }
};

// Element (0..63, within a 64-element group) that decode64 puts in lane `lane` of vector `vec`.
inline int decode64_position(int vec, int lane) {
  const int q = vec & 3;
  const int byte = lane < 4 ? 4 * q + lane : 16 + 4 * q + (lane - 4);
  return 2 * byte + (vec >= 4 ? 1 : 0);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55)));
}

}  // namespace cpu
}  // namespace fastpeft
#endif
