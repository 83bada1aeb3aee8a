// Torch custom ops of the native extension (namespace `fastpeft_native`), CPU kernels.
//
// This file defines every schema (the CUDA extension only adds CUDA kernels to
// them) and registers the CPU implementations. Arguments are validated here
// with TORCH_CHECK_VALUE / TORCH_CHECK_TYPE (ValueError / TypeError in Python)
// so that a bad call never reaches a kernel; the Python wrappers in
// fastpeft/cpu/nf4_native.py check first and give the friendlier message.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "fastpeft/nf4_codec.h"
#include "../cpu/nf4_bf16_kernels.h"
#include "../cpu/nf4_cpu_kernels.h"

namespace fastpeft {
namespace {

using at::Tensor;
namespace nf4 = fastpeft::nf4;

// Tests turn this on so that every output starts as NaN and an element a kernel forgets to write fails.
bool g_poison_outputs = false;

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!g_poison_outputs) return at::empty(sizes, options);
  if (options.dtype() == at::kByte) return at::full(sizes, 0xA5, options);  // no NaN in uint8: an unlikely byte
  return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
}

bool valid_blocksize(int64_t b) { return b >= 64 && b <= 4096 && (b & (b - 1)) == 0; }

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK_VALUE(valid_blocksize(blocksize), "blocksize must be a power of two in [64, 4096], got ", blocksize);
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

void check_format(const Tensor& packed, const Tensor& absmax, int64_t numel, int64_t blocksize) {
  check_blocksize(blocksize);
  TORCH_CHECK_VALUE(numel > 0, "numel must be positive, got ", numel);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() == (numel + 1) / 2, "packed has ", packed.numel(), " bytes, ", numel,
                    " elements need ", (numel + 1) / 2);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax.numel() == nblocks, "absmax has ", absmax.numel(), " entries, ", numel,
                    " elements in blocks of ", blocksize, " need ", nblocks);
  TORCH_CHECK_VALUE(packed.is_contiguous() && absmax.is_contiguous(), "packed and absmax must be contiguous");
}

void check_matrix_format(const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K, int64_t blocksize) {
  TORCH_CHECK_VALUE(N > 0 && K > 0, "weight shape must be positive, got (", N, ", ", K, ")");
  check_blocksize(blocksize);
  TORCH_CHECK_VALUE(K % blocksize == 0, "K (", K, ") must be a multiple of blocksize (", blocksize,
                    ") for the fused NF4 matmul");
  check_format(packed, absmax, N * K, blocksize);
}

bool is_activation_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// ---- format -----------------------------------------------------------------

std::tuple<Tensor, Tensor> nf4_quantize(const Tensor& weight, int64_t blocksize) {
  check_cpu(weight, "weight");
  check_blocksize(blocksize);
  TORCH_CHECK_TYPE(is_activation_dtype(weight.scalar_type()), "weight must be float32, float16 or bfloat16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.numel() > 0, "weight must not be empty");
  const Tensor w = weight.contiguous();
  const int64_t numel = w.numel();
  Tensor packed = new_output({(numel + 1) / 2, 1}, w.options().dtype(at::kByte));
  Tensor absmax = new_output({(numel + blocksize - 1) / blocksize}, w.options().dtype(at::kFloat));
  auto* p = packed.data_ptr<uint8_t>();
  auto* a = absmax.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: cpu::nf4_quantize(w.data_ptr<float>(), numel, blocksize, p, a); break;
    case at::kHalf: cpu::nf4_quantize(w.data_ptr<at::Half>(), numel, blocksize, p, a); break;
    default: cpu::nf4_quantize(w.data_ptr<at::BFloat16>(), numel, blocksize, p, a); break;
  }
  return {packed, absmax};
}

std::tuple<Tensor, Tensor> dynamic_quantize(const Tensor& values, const Tensor& code, int64_t blocksize) {
  check_cpu(values, "values");
  check_cpu(code, "code");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, "values must be float32, got ", values.scalar_type());
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat, "code must be float32, got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.numel() == 256, "code must have 256 entries, got ", code.numel());
  TORCH_CHECK_VALUE(blocksize > 0, "blocksize must be positive, got ", blocksize);
  const Tensor v = values.contiguous().reshape(-1);
  const Tensor c = code.contiguous();
  const int64_t n = v.numel();
  Tensor out = new_output({n}, v.options().dtype(at::kByte));
  Tensor absmax = new_output({(n + blocksize - 1) / blocksize}, v.options());
  cpu::dynamic_quantize(v.data_ptr<float>(), n, blocksize, c.data_ptr<float>(), out.data_ptr<uint8_t>(),
                        absmax.data_ptr<float>());
  return {out, absmax};
}

Tensor nested_scales(const Tensor& qabsmax, const Tensor& nested_absmax, const Tensor& code2, double offset) {
  check_cpu(qabsmax, "qabsmax");
  TORCH_CHECK_TYPE(qabsmax.scalar_type() == at::kByte, "qabsmax must be uint8, got ", qabsmax.scalar_type());
  TORCH_CHECK_TYPE(nested_absmax.scalar_type() == at::kFloat, "nested_absmax must be float32");
  TORCH_CHECK_TYPE(code2.scalar_type() == at::kFloat, "code2 must be float32");
  TORCH_CHECK_VALUE(code2.numel() == 256, "code2 must have 256 entries, got ", code2.numel());
  const int64_t nblocks = qabsmax.numel();
  TORCH_CHECK_VALUE(nested_absmax.numel() == (nblocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize,
                    "nested_absmax has ", nested_absmax.numel(), " entries, ", nblocks, " blocks need ",
                    (nblocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize);
  const Tensor q = qabsmax.contiguous(), a2 = nested_absmax.contiguous(), c2 = code2.contiguous();
  Tensor out = new_output({nblocks}, a2.options());
  cpu::nested_scales(q.data_ptr<uint8_t>(), a2.data_ptr<float>(), c2.data_ptr<float>(), static_cast<float>(offset),
                     nblocks, out.data_ptr<float>());
  return out;
}

Tensor nf4_dequantize(const Tensor& packed, const Tensor& absmax, int64_t numel, int64_t blocksize,
                      at::ScalarType dtype) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_format(packed, absmax, numel, blocksize);
  TORCH_CHECK_TYPE(is_activation_dtype(dtype), "dtype must be float32, float16 or bfloat16, got ", dtype);
  Tensor out = new_output({numel}, packed.options().dtype(dtype));
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* a = absmax.data_ptr<float>();
  switch (dtype) {
    case at::kFloat: cpu::nf4_dequantize(p, a, numel, blocksize, out.data_ptr<float>()); break;
    case at::kHalf: cpu::nf4_dequantize(p, a, numel, blocksize, out.data_ptr<at::Half>()); break;
    default: cpu::nf4_dequantize(p, a, numel, blocksize, out.data_ptr<at::BFloat16>()); break;
  }
  return out;
}

// ---- fused matmuls --------------------------------------------------------------

// Rows of W dequantized per GEMM panel: about 1 MiB of fp32, at least 16 rows.
int64_t panel_rows(int64_t N, int64_t K) {
  const int64_t rows = std::max<int64_t>(16, (int64_t{1} << 18) / K);
  return std::min(N, rows);
}

void check_activation(const Tensor& t, const char* name, int64_t cols, const char* what) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got ", t.dim(), " dimensions");
  TORCH_CHECK_TYPE(is_activation_dtype(t.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) == cols, name, " has ", t.size(1), " columns, expected ", what, " = ", cols);
}

Tensor nf4_matmul(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                  int64_t blocksize, const c10::optional<Tensor>& bias) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(x, "x", K, "K");
  Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N, ",), got ", bias->sizes());
    bias32 = bias->to(at::kFloat).contiguous();
  }
  const int64_t M = x.size(0);
  const Tensor x32 = x.to(at::kFloat).contiguous();
  Tensor y = new_output({M, N}, x32.options());
  if (M == 0) return y.to(x.scalar_type());
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* a = absmax.data_ptr<float>();
  if (M <= cpu::kMaxGemvRows) {
    cpu::nf4_gemv(x32.data_ptr<float>(), M, p, a, N, K, blocksize, bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                  y.data_ptr<float>());
  } else {
    const int64_t rows = panel_rows(N, K);
    Tensor panel = new_output({rows, K}, x32.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      cpu::nf4_dequantize_rows_f32(p, a, K, blocksize, n0, n0 + r, panel.data_ptr<float>());
      Tensor out = y.narrow(1, n0, r);
      at::mm_out(out, x32, panel.narrow(0, 0, r).t());
    }
    if (bias32.defined()) y.add_(bias32);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

Tensor nf4_matmul_transposed(const Tensor& dy, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                             int64_t blocksize) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(dy, "dy", N, "N");
  const int64_t M = dy.size(0);
  const Tensor g32 = dy.to(at::kFloat).contiguous();
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* a = absmax.data_ptr<float>();
  Tensor dx;
  if (M == 0) {
    dx = at::empty({0, K}, g32.options());
  } else if (M <= cpu::kMaxGemvTransposedRows) {
    dx = new_output({M, K}, g32.options());
    cpu::nf4_gemv_transposed(g32.data_ptr<float>(), M, p, a, N, K, blocksize, dx.data_ptr<float>());
  } else {
    dx = at::zeros({M, K}, g32.options());
    const int64_t rows = panel_rows(N, K);
    Tensor panel = new_output({rows, K}, g32.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      cpu::nf4_dequantize_rows_f32(p, a, K, blocksize, n0, n0 + r, panel.data_ptr<float>());
      dx.addmm_(g32.narrow(1, n0, r), panel.narrow(0, 0, r));
    }
  }
  return dy.scalar_type() == at::kFloat ? dx : dx.to(dy.scalar_type());
}

// ---- dequantized matmuls: W dequantized to x's dtype (bf16 or fp32) in large tiles, then torch's GEMM ----
// (bf16: oneDNN with AMX / AVX512-BF16 where the CPU has them, fp32 accumulation). Each output element
// comes from one GEMM over the whole reduction, so nothing is rounded to bf16 before the end.

// Bytes of dequantized W per tile (16 MiB): W up to this size is dequantized once per call.
constexpr int64_t kTileBytes = int64_t{1} << 24;

void check_bf16(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBFloat16, name, " must be bfloat16 for the bf16 NF4 path, got ",
                   t.scalar_type());
}

void check_f32(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32 for this fp32 NF4 op, got ", t.scalar_type());
}

// A [rows, cols] view over the front of `buffer` (bf16 or fp32) holding W[r0:r0+rows, c0:c0+cols].
Tensor dequantize_tile_into(const Tensor& buffer, const Tensor& packed, const Tensor& absmax, int64_t K,
                            int64_t blocksize, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
  Tensor tile = buffer.view(-1).narrow(0, 0, rows * cols).view({rows, cols});
  if (buffer.scalar_type() == at::kFloat) {
    cpu::nf4_dequantize_tile_f32(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), K, blocksize, r0, r0 + rows,
                                 c0, c0 + cols, tile.data_ptr<float>(), cols);
  } else {
    cpu::nf4_dequantize_tile_bf16(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), K, blocksize, r0, r0 + rows,
                                  c0, c0 + cols, tile.data_ptr<at::BFloat16>(), cols);
  }
  return tile;
}

Tensor nf4_dequantize_bf16_tile(const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K, int64_t blocksize,
                                int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  TORCH_CHECK_VALUE(0 <= row_begin && row_begin <= row_end && row_end <= N, "rows [", row_begin, ", ", row_end,
                    ") are not inside [0, ", N, ")");
  TORCH_CHECK_VALUE(0 <= col_begin && col_begin <= col_end && col_end <= K, "columns [", col_begin, ", ", col_end,
                    ") are not inside [0, ", K, ")");
  TORCH_CHECK_VALUE(col_begin % cpu::kBf16TileColumnAlign == 0 && col_end % cpu::kBf16TileColumnAlign == 0,
                    "columns [", col_begin, ", ", col_end, ") must start and end on multiples of ",
                    cpu::kBf16TileColumnAlign);
  const int64_t rows = row_end - row_begin, cols = col_end - col_begin;
  Tensor out = new_output({rows, cols}, packed.options().dtype(at::kBFloat16));
  if (rows == 0 || cols == 0) return out;
  return dequantize_tile_into(out, packed, absmax, K, blocksize, row_begin, rows, col_begin, cols);
}

// x · dequant(W)ᵀ (+ bias) in x's dtype (bf16 or fp32): W dequantized to that dtype in row tiles, torch's GEMM.
Tensor dequantized_matmul(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                          int64_t blocksize, const c10::optional<Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias has dtype ", bias->scalar_type(), " but x has ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N, ",), got ", bias->sizes());
  }
  const int64_t M = x.size(0);
  if (M == 0) return new_output({0, N}, x.options());
  const Tensor xc = x.contiguous();
  const int64_t rows = std::min(N, std::max<int64_t>(16, kTileBytes / x.element_size() / K));
  Tensor buffer = new_output({rows, K}, x.options());
  auto panel_product = [&](int64_t n0, int64_t r) {
    const Tensor w = dequantize_tile_into(buffer, packed, absmax, K, blocksize, n0, r, 0, K);
    return has_bias ? at::addmm(bias->narrow(0, n0, r), xc, w.t()) : at::mm(xc, w.t());
  };
  if (rows == N) return panel_product(0, N);
  Tensor y = new_output({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t r = std::min(rows, N - n0);
    y.narrow(1, n0, r).copy_(panel_product(n0, r));
  }
  return y;
}

// dy · dequant(W) in dy's dtype: column tiles of W (all N rows), so each dx column is one GEMM over all of N.
Tensor dequantized_matmul_transposed(const Tensor& dy, const Tensor& packed, const Tensor& absmax, int64_t N,
                                     int64_t K, int64_t blocksize) {
  const int64_t M = dy.size(0);
  if (M == 0) return new_output({0, K}, dy.options());
  const Tensor g = dy.contiguous();
  const int64_t align = cpu::kBf16TileColumnAlign;
  const int64_t cols = std::min(K, std::max(align, kTileBytes / dy.element_size() / N / align * align));
  Tensor buffer = new_output({N, cols}, dy.options());
  if (cols == K) return at::mm(g, dequantize_tile_into(buffer, packed, absmax, K, blocksize, 0, N, 0, K));
  Tensor dx = new_output({M, K}, dy.options());
  for (int64_t c0 = 0; c0 < K; c0 += cols) {
    const int64_t c = std::min(cols, K - c0);
    dx.narrow(1, c0, c).copy_(at::mm(g, dequantize_tile_into(buffer, packed, absmax, K, blocksize, 0, N, c0, c)));
  }
  return dx;
}

Tensor nf4_matmul_bf16(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                       int64_t blocksize, const c10::optional<Tensor>& bias) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(x, "x", K, "K");
  check_bf16(x, "x");
  return dequantized_matmul(x, packed, absmax, N, K, blocksize, bias);
}

Tensor nf4_matmul_transposed_bf16(const Tensor& dy, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                                  int64_t blocksize) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(dy, "dy", N, "N");
  check_bf16(dy, "dy");
  return dequantized_matmul_transposed(dy, packed, absmax, N, K, blocksize);
}

Tensor nf4_matmul_f32_dequantized(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                                  int64_t blocksize, const c10::optional<Tensor>& bias) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(x, "x", K, "K");
  check_f32(x, "x");
  return dequantized_matmul(x, packed, absmax, N, K, blocksize, bias);
}

Tensor nf4_matmul_transposed_f32_dequantized(const Tensor& dy, const Tensor& packed, const Tensor& absmax, int64_t N,
                                             int64_t K, int64_t blocksize) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(dy, "dy", N, "N");
  check_f32(dy, "dy");
  return dequantized_matmul_transposed(dy, packed, absmax, N, K, blocksize);
}

Tensor nf4_matmul_bf16_amx(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                           int64_t blocksize, const c10::optional<Tensor>& bias) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(x, "x", K, "K");
  check_bf16(x, "x");
  Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    check_bf16(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N, ",), got ", bias->sizes());
    bias_c = bias->contiguous();
  }
  TORCH_CHECK(cpu::amx_bf16_available(), "nf4_matmul_bf16_amx needs AMX-BF16, which this CPU, OS or build lacks");
  const int64_t M = x.size(0);
  Tensor y = new_output({M, N}, x.options());
  if (M == 0) return y;
  const Tensor xc = x.contiguous();
  cpu::nf4_matmul_bf16_amx(xc.data_ptr<at::BFloat16>(), M, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), N,
                           K, blocksize, bias_c.defined() ? bias_c.data_ptr<at::BFloat16>() : nullptr,
                           y.data_ptr<at::BFloat16>());
  return y;
}

Tensor nf4_matmul_transposed_bf16_amx(const Tensor& dy, const Tensor& packed, const Tensor& absmax, int64_t N,
                                      int64_t K, int64_t blocksize) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_matrix_format(packed, absmax, N, K, blocksize);
  check_activation(dy, "dy", N, "N");
  check_bf16(dy, "dy");
  TORCH_CHECK(cpu::amx_bf16_available(),
              "nf4_matmul_transposed_bf16_amx needs AMX-BF16, which this CPU, OS or build lacks");
  const int64_t M = dy.size(0);
  Tensor dx = new_output({M, K}, dy.options());
  if (M == 0) return dx;
  const Tensor g = dy.contiguous();
  cpu::nf4_matmul_transposed_bf16_amx(g.data_ptr<at::BFloat16>(), M, packed.data_ptr<uint8_t>(),
                                      absmax.data_ptr<float>(), N, K, blocksize, dx.data_ptr<at::BFloat16>());
  return dx;
}

bool bf16_simd_enabled() { return cpu::bf16_simd_enabled(); }

bool amx_bf16_available() { return cpu::amx_bf16_available(); }

// ---- the shared header, exposed element by element for tests --------------------

Tensor codec_encode(const Tensor& scaled) {
  check_cpu(scaled, "scaled");
  TORCH_CHECK_TYPE(scaled.scalar_type() == at::kFloat, "scaled must be float32");
  const Tensor s = scaled.contiguous();
  Tensor out = at::empty(s.sizes(), s.options().dtype(at::kByte));
  const float* src = s.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < s.numel(); ++i) dst[i] = nf4::encode(src[i]);
  return out;
}

Tensor codec_decode(const Tensor& nibbles, const Tensor& absmax) {
  check_cpu(nibbles, "nibbles");
  TORCH_CHECK_TYPE(nibbles.scalar_type() == at::kByte, "nibbles must be uint8");
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "absmax must be float32");
  TORCH_CHECK_VALUE(nibbles.sizes() == absmax.sizes(), "nibbles and absmax must have one shape");
  const Tensor q = nibbles.contiguous(), a = absmax.contiguous();
  Tensor out = at::empty(q.sizes(), a.options());
  for (int64_t i = 0; i < q.numel(); ++i) {
    out.data_ptr<float>()[i] = nf4::decode(q.data_ptr<uint8_t>()[i], a.data_ptr<float>()[i]);
  }
  return out;
}

Tensor codec_unpack(const Tensor& packed, int64_t numel) {
  check_cpu(packed, "packed");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be uint8");
  TORCH_CHECK_VALUE(numel >= 0 && (numel + 1) / 2 <= packed.numel(), "numel does not fit in packed");
  const Tensor p = packed.contiguous();
  Tensor out = at::empty({numel}, p.options());
  for (int64_t i = 0; i < numel; ++i) out.data_ptr<uint8_t>()[i] = nf4::nibble_at(p.data_ptr<uint8_t>(), i);
  return out;
}

Tensor codec_table() {
  Tensor out = at::empty({2 * nf4::kNumCodes - 1}, at::kFloat);  // 16 codes then 15 midpoints
  for (int i = 0; i < nf4::kNumCodes; ++i) out.data_ptr<float>()[i] = nf4::code_value(i);
  for (int i = 0; i + 1 < nf4::kNumCodes; ++i) out.data_ptr<float>()[nf4::kNumCodes + i] = nf4::midpoint(i);
  return out;
}

bool simd_enabled() { return cpu::simd_enabled(); }

bool set_output_poison(bool on) {
  const bool before = g_poison_outputs;
  g_poison_outputs = on;
  return before;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY(fastpeft_native, m) {
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor, Tensor)");
  m.def("dynamic_quantize(Tensor values, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("nested_scales(Tensor qabsmax, Tensor nested_absmax, Tensor code2, float offset) -> Tensor");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int numel, int blocksize, ScalarType dtype) -> Tensor");
  m.def("nf4_matmul(Tensor x, Tensor packed, Tensor absmax, int N, int K, int blocksize, Tensor? bias) -> Tensor");
  m.def("nf4_matmul_transposed(Tensor dy, Tensor packed, Tensor absmax, int N, int K, int blocksize) -> Tensor");
  m.def("codec_encode(Tensor scaled) -> Tensor");
  m.def("codec_decode(Tensor nibbles, Tensor absmax) -> Tensor");
  m.def("codec_unpack(Tensor packed, int numel) -> Tensor");
  m.def("codec_table() -> Tensor", &fastpeft::codec_table);
  m.def("simd_enabled() -> bool", &fastpeft::simd_enabled);
  m.def("nf4_dequantize_bf16_tile(Tensor packed, Tensor absmax, int N, int K, int blocksize, int row_begin, "
        "int row_end, int col_begin, int col_end) -> Tensor");
  m.def("nf4_matmul_bf16(Tensor x, Tensor packed, Tensor absmax, int N, int K, int blocksize, Tensor? bias) -> Tensor");
  m.def("nf4_matmul_transposed_bf16(Tensor dy, Tensor packed, Tensor absmax, int N, int K, int blocksize) -> Tensor");
  m.def("bf16_simd_enabled() -> bool", &fastpeft::bf16_simd_enabled);
  m.def("nf4_matmul_bf16_amx(Tensor x, Tensor packed, Tensor absmax, int N, int K, int blocksize, Tensor? bias) -> Tensor");
  m.def("nf4_matmul_transposed_bf16_amx(Tensor dy, Tensor packed, Tensor absmax, int N, int K, int blocksize) -> Tensor");
  m.def("amx_bf16_available() -> bool", &fastpeft::amx_bf16_available);
  m.def("nf4_matmul_f32_dequantized(Tensor x, Tensor packed, Tensor absmax, int N, int K, int blocksize, Tensor? bias) -> Tensor");
  m.def("nf4_matmul_transposed_f32_dequantized(Tensor dy, Tensor packed, Tensor absmax, int N, int K, int blocksize) -> Tensor");
  m.def("set_output_poison(bool on) -> bool", &fastpeft::set_output_poison);
}

TORCH_LIBRARY_IMPL(fastpeft_native, CPU, m) {
  m.impl("nf4_quantize", &fastpeft::nf4_quantize);
  m.impl("dynamic_quantize", &fastpeft::dynamic_quantize);
  m.impl("nested_scales", &fastpeft::nested_scales);
  m.impl("nf4_dequantize", &fastpeft::nf4_dequantize);
  m.impl("nf4_matmul", &fastpeft::nf4_matmul);
  m.impl("nf4_matmul_transposed", &fastpeft::nf4_matmul_transposed);
  m.impl("nf4_dequantize_bf16_tile", &fastpeft::nf4_dequantize_bf16_tile);
  m.impl("nf4_matmul_bf16", &fastpeft::nf4_matmul_bf16);
  m.impl("nf4_matmul_transposed_bf16", &fastpeft::nf4_matmul_transposed_bf16);
  m.impl("nf4_matmul_bf16_amx", &fastpeft::nf4_matmul_bf16_amx);
  m.impl("nf4_matmul_transposed_bf16_amx", &fastpeft::nf4_matmul_transposed_bf16_amx);
  m.impl("nf4_matmul_f32_dequantized", &fastpeft::nf4_matmul_f32_dequantized);
  m.impl("nf4_matmul_transposed_f32_dequantized", &fastpeft::nf4_matmul_transposed_f32_dequantized);
  m.impl("codec_encode", &fastpeft::codec_encode);
  m.impl("codec_decode", &fastpeft::codec_decode);
  m.impl("codec_unpack", &fastpeft::codec_unpack);
}
