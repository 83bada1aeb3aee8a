// NF4 element arithmetic shared by the CPU (C++) and CUDA kernels.
//
// Everything here is the scalar definition of the bitsandbytes-compatible NF4
// format (docs/architecture.md, "NF4 and bitsandbytes"): code table, encoding by fp32 midpoints with strict
// `>`, nibble order (element 2j is the high nibble of byte j), one-multiply
// decode, and the double-quantized block scale. The CPU build tests these
// functions directly, so the GPU kernels run arithmetic that is checked here.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {
namespace nf4 {

constexpr int kNumCodes = 16;
constexpr int kNestedBlocksize = 256;
constexpr std::uint8_t kZeroCode = 7;  // index of 0.0, also the padding nibble of an odd-length weight
// bitsandbytes' floor for a block scale before taking its reciprocal.
constexpr float kSmallestScale = 1e-38f;

// The 16 NF4 values, ascending (exact fp32 values of bitsandbytes' table).
FASTPEFT_HD float code_value(int index) {
  constexpr float table[kNumCodes] = {
      -1.0f,
      -0.6961928009986877f,
      -0.5250730514526367f,
      -0.39491748809814453f,
      -0.28444138169288635f,
      -0.18477343022823334f,
      -0.09105003625154495f,
      0.0f,
      0.07958029955625534f,
      0.16093020141124725f,
      0.24611230194568634f,
      0.33791524171829224f,
      0.44070982933044434f,
      0.5626170039176941f,
      0.7229568362236023f,
      1.0f,
  };
  return table[index & 0xF];
}

// Decision threshold between code i and code i + 1, rounded once in fp32.
FASTPEFT_HD float midpoint(int i) { return (code_value(i) + code_value(i + 1)) * 0.5f; }

// Index of the code nearest to `scaled` (already in [-1, 1]): the number of
// midpoints strictly below it, so a value exactly on a midpoint takes the lower code.
// NaN (a NaN or infinite weight in the block) takes the last code, as in bitsandbytes.
FASTPEFT_HD std::uint8_t encode(float scaled) {
  if (scaled != scaled) return kNumCodes - 1;
  int index = 0;
  for (int i = 0; i < kNumCodes - 1; ++i) index += scaled > midpoint(i) ? 1 : 0;
  return static_cast<std::uint8_t>(index);
}

FASTPEFT_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Encode one element of a full block: bitsandbytes multiplies by the reciprocal of the (floored) absmax.
FASTPEFT_HD std::uint8_t encode_in_full_block(float x, float reciprocal_absmax) {
  return encode(clamp_unit(x * reciprocal_absmax));
}

// Encode one element of the trailing partial block: bitsandbytes divides there.
FASTPEFT_HD std::uint8_t encode_in_tail_block(float x, float floored_absmax) {
  return encode(clamp_unit(x / floored_absmax));
}

FASTPEFT_HD float floor_scale(float absmax) { return absmax < kSmallestScale ? kSmallestScale : absmax; }

FASTPEFT_HD std::uint8_t high_nibble(std::uint8_t byte) { return static_cast<std::uint8_t>(byte >> 4); }
FASTPEFT_HD std::uint8_t low_nibble(std::uint8_t byte) { return static_cast<std::uint8_t>(byte & 0xF); }
FASTPEFT_HD std::uint8_t pack(std::uint8_t even, std::uint8_t odd) {
  return static_cast<std::uint8_t>((even << 4) | (odd & 0xF));
}

// Nibble of element `i` in a packed buffer.
FASTPEFT_HD std::uint8_t nibble_at(const std::uint8_t* packed, std::int64_t i) {
  const std::uint8_t byte = packed[i >> 1];
  return (i & 1) ? low_nibble(byte) : high_nibble(byte);
}

// Dequantized element: one fp32 multiply.
FASTPEFT_HD float decode(std::uint8_t nibble, float absmax) { return code_value(nibble) * absmax; }

// Element k's term of a GEMV row: its weight dequantized alone (one fp32 multiply of its code value by its
// block's absmax, as `decode`), rounded to the activation dtype by `round` (a functor float -> float), then
// times its activation in fp32. The block scale multiplies each element, never a partial sum: bitsandbytes
// (dequantize, then matmul) and the Triton kernels use these weights, so the GEMV's products are theirs bit for
// bit. `code` is the code value (a kernel reads it from its own copy of the table, e.g. in shared memory).
template <typename Round>
FASTPEFT_HD float gemv_term(float code, float absmax, float x, Round round) {
  return round(code * absmax) * x;
}

// The two terms of one packed byte, codes looked up in `table` (elements 2j and 2j + 1 share a block: blocksizes
// are even).
template <typename Round>
FASTPEFT_HD float gemv_byte_terms(const float* table, std::uint8_t byte, float absmax, float x_even, float x_odd,
                                  Round round) {
  return gemv_term(table[high_nibble(byte)], absmax, x_even, round) +
         gemv_term(table[low_nibble(byte)], absmax, x_odd, round);
}

// a * b + c with two roundings: compilers may not fuse this into an FMA (one rounding),
// because bitsandbytes rounds the product first.
FASTPEFT_HD float mul_add_unfused(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  volatile float product = a * b;
  return product + c;
#endif
}

// Block scale under double quantization: fp32(code2[q] * absmax2[group]) + offset.
FASTPEFT_HD float nested_scale(float code2_value, float group_absmax, float offset) {
  return mul_add_unfused(code2_value, group_absmax, offset);
}

// ---------------------------------------------------------------------------
// bitsandbytes' 8-bit blockwise quantizer (used for the nested absmax).
// A value v in [-1, 1] is snapped to a 65536-point grid, index
// floor((v + 1) * 0.5 * 65535 + 0.5), and a table maps grid points to the
// code whose midpoint interval holds them.
// ---------------------------------------------------------------------------
constexpr int kDynamicGridSize = 65536;

// A NaN (a NaN value, inf / inf, or anything over an absmax of 0) maps to grid point 0, i.e. code 0, as in
// bitsandbytes' CPU quantizer; casting NaN to int would be undefined behaviour.
FASTPEFT_HD int dynamic_grid_index(float normed) {
  if (normed != normed) return 0;
  const float v = clamp_unit(normed);
  return static_cast<int>(mul_add_unfused((v + 1.0f) * 0.5f, static_cast<float>(kDynamicGridSize - 1), 0.5f));
}

FASTPEFT_HD float dynamic_grid_value(int i) {
  return -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kDynamicGridSize - 1);
}

}  // namespace nf4
}  // namespace fastpeft
