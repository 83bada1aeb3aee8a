// CUDA kernels for the `fastpeft_native` ops (schemas are defined by the CPU extension's cpu_ops.cpp,
// which must be loaded first).
//
// nf4_dequantize runs the dequantize kernel; nf4_matmul runs the decode GEMV for one activation
// row and otherwise dequantizes to the activation dtype and calls cuBLAS (the Triton kernels are
// fastpeft's main GPU path; this extension is the C++ reference on the GPU).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../cuda/nf4_cuda.h"

namespace fastpeft {
namespace {

using at::Tensor;

cuda::Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "dtype must be float32, float16 or bfloat16, got ", t);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_format(const Tensor& packed, const Tensor& absmax, int64_t numel, int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                    "blocksize must be a power of two in [64, 4096], got ", blocksize);
  TORCH_CHECK_VALUE(numel > 0, "numel must be positive, got ", numel);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
  TORCH_CHECK_VALUE(packed.is_cuda() && absmax.is_cuda() && packed.device() == absmax.device(),
                    "packed and absmax must be on one CUDA device");
  TORCH_CHECK_VALUE(packed.numel() == (numel + 1) / 2, "packed has ", packed.numel(), " bytes, ", numel,
                    " elements need ", (numel + 1) / 2);
  TORCH_CHECK_VALUE(absmax.numel() == (numel + blocksize - 1) / blocksize, "absmax has ", absmax.numel(),
                    " entries, expected ", (numel + blocksize - 1) / blocksize);
}

Tensor dequantize_to(const Tensor& packed, const Tensor& absmax, int64_t numel, int64_t blocksize,
                     at::ScalarType dtype) {
  check_format(packed, absmax, numel, blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  const Tensor p = packed.contiguous(), a = absmax.contiguous();
  Tensor out = at::empty({numel}, p.options().dtype(dtype));
  check_launch(cuda::launch_nf4_dequantize(p.data_ptr<uint8_t>(), a.data_ptr<float>(), numel, blocksize,
                                           out.data_ptr(), to_dtype(dtype), c10::cuda::getCurrentCUDAStream()),
               "NF4 dequantize kernel");
  return out;
}

Tensor nf4_dequantize(const Tensor& packed, const Tensor& absmax, int64_t numel, int64_t blocksize,
                      at::ScalarType dtype) {
  return dequantize_to(packed, absmax, numel, blocksize, dtype);
}

void check_activation(const Tensor& t, const Tensor& packed, const char* name, int64_t cols) {
  TORCH_CHECK_VALUE(t.device() == packed.device(), name, " is on ", t.device(), " but packed is on ", packed.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == cols, name, " must have shape (M, ", cols, "), got ", t.sizes());
  to_dtype(t.scalar_type());
}

Tensor nf4_matmul(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                  int64_t blocksize, const c10::optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(K % blocksize == 0, "K (", K, ") must be a multiple of blocksize (", blocksize, ")");
  check_format(packed, absmax, N * K, blocksize);
  check_activation(x, packed, "x", K);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N, ",)");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype");
    // The M = 1 GEMV reads bias on the GPU: a bias on another device would be dereferenced there.
    TORCH_CHECK_VALUE(bias->device() == packed.device(), "bias is on ", bias->device(), " but packed is on ",
                      packed.device());
  }
  const c10::cuda::CUDAGuard guard(packed.device());
  Tensor p = packed.contiguous();
  if (x.size(0) == 1 && reinterpret_cast<std::uintptr_t>(p.data_ptr()) % 16 == 0) {
    const Tensor xc = x.contiguous();
    const Tensor b = has_bias ? bias->contiguous() : Tensor();
    Tensor y = at::empty({1, N}, xc.options());
    check_launch(cuda::launch_nf4_gemv(xc.data_ptr(), p.data_ptr<uint8_t>(), absmax.contiguous().data_ptr<float>(),
                                       has_bias ? b.data_ptr() : nullptr, y.data_ptr(), N, K, blocksize,
                                       to_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream()),
                 "NF4 GEMV kernel");
    return y;
  }
  const Tensor w = dequantize_to(p, absmax, N * K, blocksize, x.scalar_type()).view({N, K});
  return has_bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

Tensor nf4_matmul_transposed(const Tensor& dy, const Tensor& packed, const Tensor& absmax, int64_t N, int64_t K,
                             int64_t blocksize) {
  TORCH_CHECK_VALUE(K % blocksize == 0, "K (", K, ") must be a multiple of blocksize (", blocksize, ")");
  check_format(packed, absmax, N * K, blocksize);
  check_activation(dy, packed, "dy", N);
  const c10::cuda::CUDAGuard guard(packed.device());
  const Tensor w = dequantize_to(packed, absmax, N * K, blocksize, dy.scalar_type()).view({N, K});
  return at::mm(dy, w);
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft_native, CUDA, m) {
  m.impl("nf4_dequantize", &fastpeft::nf4_dequantize);
  m.impl("nf4_matmul", &fastpeft::nf4_matmul);
  m.impl("nf4_matmul_transposed", &fastpeft::nf4_matmul_transposed);
}
