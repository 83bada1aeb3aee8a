// Prefix attention on the CPU (fp32 and fp64): softmax over [prefix; sequence] without building it.
//
// Called by fastpeft/cpu/prefix_attention.py (its docstring has the two modes and why). Semantics
// (the op fastpeft.ops.prefix_attention):
//   - every query row sees every prefix key, and the sequence keys j <= r + (Skv - Sq) when causal,
//     and only keys whose key_padding_mask entry is true;
//   - GQA: query head h reads KV head h / (Hq / Hkv); the prefix has batch 1 (shared) or B;
//   - a row that sees no key gets output 0 and LSE -inf (and no gradient).
// `with_sequence == true` ("direct"): one pass per query row over the prefix and the sequence keys.
// `with_sequence == false` ("merged"): only the prefix keys, merged into an already normalised partial
// (out_init, lse_init: the sequence partial from torch's flash kernel) in place, so the result is
// out_init; the merge is the online-softmax update started from that state. Its backward returns the
// prefix keys' share of dq and the prefix gradients, computed with the merged output and LSE.
//
// Every tensor's last dimension must have stride 1 (the Python caller makes it so); the other strides
// are free (HF's [B, S, H, D] projections seen as [B, H, S, D] are read in place).
// The schemas are registered here as a fragment of the fastpeft_native library.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastpeft {
namespace {

using at::Tensor;

// Tests turn this on so that every output a kernel must write starts as NaN (an unwritten element fails).
bool g_poison_outputs = false;

Tensor new_like(const Tensor& like) {
  Tensor t = at::empty_like(like);
  return g_poison_outputs ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
}

bool prefix_attention_poison_outputs(bool on) {
  const bool before = g_poison_outputs;
  g_poison_outputs = on;
  return before;
}

// exp(x) for the softmax, branch-free so that a loop over it vectorizes; exactly 0 below -87.3, NaN for NaN
// (std::max/std::min return their first argument when either is NaN, so the clamp keeps it).
// Cephes' single-precision polynomial (about 1 ulp on the range the softmax uses, x <= ~0).
inline float softmax_exp(float x) {
  const float clamped = std::min(std::max(x, -87.3f), 88.0f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

inline double softmax_exp(double x) { return std::exp(x); }

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Row kernels on key/value rows `base + j * stride` (j < n), each `d` long and contiguous.

// s[j] = scale * <x, row j>
template <typename T>
inline void scores(const T* x, const T* base, int64_t stride, int64_t n, int64_t d, T scale, T* s) {
  for (int64_t j = 0; j < n; ++j) s[j] = scale * dot(x, base + j * stride, d);
}

// s[j] = scale * <x, column j of the packed [d, n] matrix kt> (a prefix packed transposed once per call:
// no horizontal sums, the score of 16 keys per vector)
template <typename T>
inline void scores_packed(const T* x, const T* kt, int64_t n, int64_t d, T scale, T* s) {
  std::fill(s, s + n, T(0));
  for (int64_t i = 0; i < d; ++i) {
    const T xi = x[i];
    const T* col = kt + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] += xi * col[j];
  }
  for (int64_t j = 0; j < n; ++j) s[j] *= scale;
}

// s[j] = exp(s[j] - shift); returns the sum. Entries of -inf become 0.
template <typename T>
inline T exp_sum(T* s, int64_t n, T shift) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = softmax_exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// out += sum_j w[j] * row j (out is d long)
template <typename T>
inline void accumulate(const T* w, const T* base, int64_t stride, int64_t n, int64_t d, T* out) {
  for (int64_t j = 0; j < n; ++j) {
    if (w[j] != T(0)) axpy(w[j], base + j * stride, out, d);
  }
}

#if defined(__AVX512F__)
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// fp32 with AVX-512: two independent accumulators (an FMA chain is latency bound at head_dim 64).
template <>
inline float dot<float>(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <>
inline void axpy<float>(float alpha, const float* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 sum = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
    _mm512_mask_storeu_ps(y + i, m, sum);
  }
}

template <>
inline void scores_packed<float>(const float* x, const float* kt, int64_t n, int64_t d, float scale, float* s) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 64) {
    const __mmask16 m0 = tail_mask(n - j), m1 = tail_mask(n - j - 16), m2 = tail_mask(n - j - 32),
                    m3 = tail_mask(n - j - 48);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const __m512 xi = _mm512_set1_ps(x[i]);
      const float* col = kt + i * n + j;
      a0 = _mm512_fmadd_ps(xi, _mm512_maskz_loadu_ps(m0, col), a0);
      a1 = _mm512_fmadd_ps(xi, _mm512_maskz_loadu_ps(m1, col + 16), a1);
      a2 = _mm512_fmadd_ps(xi, _mm512_maskz_loadu_ps(m2, col + 32), a2);
      a3 = _mm512_fmadd_ps(xi, _mm512_maskz_loadu_ps(m3, col + 48), a3);
    }
    _mm512_mask_storeu_ps(s + j, m0, _mm512_mul_ps(a0, vscale));
    _mm512_mask_storeu_ps(s + j + 16, m1, _mm512_mul_ps(a1, vscale));
    _mm512_mask_storeu_ps(s + j + 32, m2, _mm512_mul_ps(a2, vscale));
    _mm512_mask_storeu_ps(s + j + 48, m3, _mm512_mul_ps(a3, vscale));
  }
}

// The same polynomial as softmax_exp(float), 16 lanes. _mm512_max_ps / _mm512_min_ps return their second
// operand when either is NaN: x goes second, so a NaN lane stays NaN through the clamp (and the result).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __m512 c = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(lo, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(c, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(~zero, p, _mm512_castsi512_ps(bits));
}

template <>
inline float exp_sum<float>(float* s, int64_t n, float shift) {
  const __m512 vs = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vs));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// The output row stays in registers, 64 columns at a time (no store-to-load chain through memory).
template <>
inline void accumulate<float>(const float* w, const float* base, int64_t stride, int64_t n, int64_t d, float* out) {
  for (int64_t c = 0; c < d; c += 64) {
    const __mmask16 m0 = tail_mask(d - c), m1 = tail_mask(d - c - 16), m2 = tail_mask(d - c - 32),
                    m3 = tail_mask(d - c - 48);
    const bool more1 = d - c > 16, more2 = d - c > 32, more3 = d - c > 48;
    __m512 a0 = _mm512_maskz_loadu_ps(m0, out + c);
    __m512 a1 = more1 ? _mm512_maskz_loadu_ps(m1, out + c + 16) : _mm512_setzero_ps();
    __m512 a2 = more2 ? _mm512_maskz_loadu_ps(m2, out + c + 32) : _mm512_setzero_ps();
    __m512 a3 = more3 ? _mm512_maskz_loadu_ps(m3, out + c + 48) : _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      if (w[j] == 0.0f) continue;
      const __m512 wj = _mm512_set1_ps(w[j]);
      const float* row = base + j * stride + c;
      a0 = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(m0, row), a0);
      if (more1) a1 = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(m1, row + 16), a1);
      if (more2) a2 = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(m2, row + 32), a2);
      if (more3) a3 = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(m3, row + 48), a3);
    }
    _mm512_mask_storeu_ps(out + c, m0, a0);
    if (more1) _mm512_mask_storeu_ps(out + c + 16, m1, a1);
    if (more2) _mm512_mask_storeu_ps(out + c + 32, m2, a2);
    if (more3) _mm512_mask_storeu_ps(out + c + 48, m3, a3);
  }
}

// Four query rows at once against a packed prefix (the same [d, n] layout as scores_packed): each column
// load serves four rows. s is [4][ld].
inline void scores_packed4(const float* const x[4], const float* kt, int64_t n, int64_t d, float scale, float* s,
                           int64_t ld) {
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 32 < n; j += 64) {  // more than 32 keys left: 64 at a time (half the broadcasts per FMA)
    __mmask16 m[4];
    for (int q = 0; q < 4; ++q) m[q] = tail_mask(n - j - 16 * q);
    __m512 a[4][4];
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) a[r][q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const float* col = kt + i * n + j;
      __m512 c[4];
      for (int q = 0; q < 4; ++q) c[q] = _mm512_maskz_loadu_ps(m[q], col + 16 * q);
      for (int r = 0; r < 4; ++r) {
        const __m512 xi = _mm512_set1_ps(x[r][i]);
        for (int q = 0; q < 4; ++q) a[r][q] = _mm512_fmadd_ps(xi, c[q], a[r][q]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(s + r * ld + j + 16 * q, m[q], _mm512_mul_ps(a[r][q], vscale));
  }
  for (; j < n; j += 32) {
    const __mmask16 m0 = tail_mask(n - j), m1 = tail_mask(n - j - 16);
    __m512 a[4][2];
    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const float* col = kt + i * n + j;
      const __m512 c0 = _mm512_maskz_loadu_ps(m0, col), c1 = _mm512_maskz_loadu_ps(m1, col + 16);
      for (int r = 0; r < 4; ++r) {
        const __m512 xi = _mm512_set1_ps(x[r][i]);
        a[r][0] = _mm512_fmadd_ps(xi, c0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(xi, c1, a[r][1]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      _mm512_mask_storeu_ps(s + r * ld + j, m0, _mm512_mul_ps(a[r][0], vscale));
      _mm512_mask_storeu_ps(s + r * ld + j + 16, m1, _mm512_mul_ps(a[r][1], vscale));
    }
  }
}

// out[r] += sum_j w[r * ld + j] * row j for four output rows: each value-row load serves four rows.
inline void accumulate4(const float* w, int64_t ld, const float* base, int64_t stride, int64_t n, int64_t d,
                        float* const out[4]) {
  for (int64_t c = 0; c < d; c += 64) {
    __mmask16 m[4];
    for (int q = 0; q < 4; ++q) m[q] = tail_mask(d - c - 16 * q);
    __m512 a[4][4];
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) a[r][q] = _mm512_maskz_loadu_ps(m[q], out[r] + c + 16 * q);
    for (int64_t j = 0; j < n; ++j) {
      const float* row = base + j * stride + c;
      __m512 v[4];
      for (int q = 0; q < 4; ++q) v[q] = _mm512_maskz_loadu_ps(m[q], row + 16 * q);
      for (int r = 0; r < 4; ++r) {
        const __m512 wr = _mm512_set1_ps(w[r * ld + j]);
        for (int q = 0; q < 4; ++q) a[r][q] = _mm512_fmadd_ps(wr, v[q], a[r][q]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(out[r] + c + 16 * q, m[q], a[r][q]);
  }
}
// dst row j += sum_i w[i * ld + j] * x[i] for the n rows of dst (the prefix gradients of four query rows).
// 64 columns at a time with the four x chunks held in registers: one load and one store of dst per
// four FMAs.
inline void outer4(const float* w, int64_t ld, const float* const x[4], int64_t n, int64_t d, float* dst,
                   int64_t dst_stride) {
  for (int64_t c = 0; c < d; c += 64) {
    __mmask16 m[4];
    __m512 xr[4][4];
    for (int q = 0; q < 4; ++q) {
      m[q] = tail_mask(d - c - 16 * q);
      for (int i = 0; i < 4; ++i) xr[i][q] = _mm512_maskz_loadu_ps(m[q], x[i] + c + 16 * q);
    }
    const int chunks = static_cast<int>(std::min<int64_t>(4, (d - c + 15) / 16));
    for (int64_t j = 0; j < n; ++j) {
      const __m512 w0 = _mm512_set1_ps(w[j]), w1 = _mm512_set1_ps(w[ld + j]), w2 = _mm512_set1_ps(w[2 * ld + j]),
                   w3 = _mm512_set1_ps(w[3 * ld + j]);
      float* row = dst + j * dst_stride + c;
      for (int q = 0; q < chunks; ++q) {
        __m512 acc = _mm512_maskz_loadu_ps(m[q], row + 16 * q);
        acc = _mm512_fmadd_ps(w0, xr[0][q], acc);
        acc = _mm512_fmadd_ps(w1, xr[1][q], acc);
        acc = _mm512_fmadd_ps(w2, xr[2][q], acc);
        acc = _mm512_fmadd_ps(w3, xr[3][q], acc);
        _mm512_mask_storeu_ps(row + 16 * q, m[q], acc);
      }
    }
  }
}
// s[i * ld + j] = scale * <x[i], row j> for four query rows: each key row loaded serves four rows.
inline void scores4(const float* const x[4], const float* base, int64_t stride, int64_t n, int64_t d, float scale,
                    float* s, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    const float* row = base + j * stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      const __mmask16 m = tail_mask(d - c);
      const __m512 kc = _mm512_maskz_loadu_ps(m, row + c);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x[0] + c), kc, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x[1] + c), kc, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x[2] + c), kc, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x[3] + c), kc, a3);
    }
    s[j] = scale * _mm512_reduce_add_ps(a0);
    s[ld + j] = scale * _mm512_reduce_add_ps(a1);
    s[2 * ld + j] = scale * _mm512_reduce_add_ps(a2);
    s[3 * ld + j] = scale * _mm512_reduce_add_ps(a3);
  }
}
#define FASTPEFT_PREFIX_QUAD 1
#endif

// A [*, *, S, D] tensor read through its strides (last stride 1).
template <typename T>
struct View4 {
  const T* data;
  int64_t s0, s1, s2;
  View4(const Tensor& t) : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const T* row(int64_t i, int64_t j, int64_t k) const { return data + i * s0 + j * s1 + k * s2; }
};

template <typename T>
struct MutView4 {
  T* data;
  int64_t s0, s1, s2;
  MutView4(Tensor& t) : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  T* row(int64_t i, int64_t j, int64_t k) const { return data + i * s0 + j * s1 + k * s2; }
};

struct Shape {
  int64_t B, Hq, Hkv, G, Sq, Skv, P, D;
  bool causal, with_sequence, prefix_batched;
  const bool* mask;  // [B, Skv] contiguous, or nullptr
  int64_t mask_stride;

  // One past the last sequence key query row r sees (before padding).
  int64_t seq_end(int64_t r) const {
    if (!with_sequence) return 0;
    if (!causal) return Skv;
    return std::max<int64_t>(0, std::min<int64_t>(Skv, r + (Skv - Sq) + 1));
  }
  bool visible(int64_t b, int64_t j) const { return mask == nullptr || mask[b * mask_stride + j]; }
};

// The maximum of s[0, n) as torch.max gives it: NaN when any entry is NaN (the NaN flag rides in the same
// loop), -inf for n == 0.
template <typename T>
inline T row_max(const T* s, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    mx = s[j] > mx ? s[j] : mx;
    nan |= s[j] != s[j];
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : mx;
}

// max(a, b) that is NaN when either is (std::max drops a NaN second argument).
template <typename T>
inline T max_nan(T a, T b) {
  return a != a || b != b ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

// A row whose maximum score is NaN or +inf: torch's softmax makes every probability NaN (exp(inf - inf) is
// NaN, and so is their sum), so the output row is NaN; torch.logsumexp gives NaN or +inf, the maximum.
template <typename T>
inline bool nonfinite_max(T mx) {
  return !(mx < std::numeric_limits<T>::infinity());
}

// Scores of one query row against the prefix keys (first P entries) and the visible sequence keys
// (the next `end`); hidden keys get -inf. Returns the row maximum (-inf when nothing is visible, NaN when
// a score is NaN).
template <typename T>
T row_scores(const Shape& sh, const T* qrow, const T* pkt, const T* k, int64_t k_stride, int64_t b, int64_t end,
             T scale, T* s) {
  scores_packed(qrow, pkt, sh.P, sh.D, scale, s);
  scores(qrow, k, k_stride, end, sh.D, scale, s + sh.P);
  if (sh.mask != nullptr) {
    for (int64_t j = 0; j < end; ++j) {
      if (!sh.visible(b, j)) s[sh.P + j] = -std::numeric_limits<T>::infinity();
    }
  }
  return row_max(s, sh.P + end);
}

#ifdef FASTPEFT_PREFIX_QUAD
// The prefix-only merge for four query rows that read the same KV head (four heads of one GQA group at
// one position): each packed-prefix column and prefix-value row loaded serves four rows.
// x: query rows, o: output rows (hold the initial partial when init_lse is finite), s: [4][P] scratch.
inline void prefix_merge_quad(const Shape& sh, const float* const x[4], float* const o[4], const float init_lse[4],
                              float* const lse_out[4], const float* pkt, const float* pv, int64_t pv_stride,
                              float scale, float* s) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t ld = sh.P;
  scores_packed4(x, pkt, sh.P, sh.D, scale, s, ld);
  for (int i = 0; i < 4; ++i) {
    float* si = s + i * ld;
    const float mx = max_nan(row_max(si, sh.P), init_lse[i]);
    if (nonfinite_max(mx)) {
      std::fill(si, si + sh.P, 0.0f);
      std::fill(o[i], o[i] + sh.D, std::numeric_limits<float>::quiet_NaN());
      *lse_out[i] = mx;
      continue;
    }
    const float sum = exp_sum(si, sh.P, mx) + (init_lse[i] == neg_inf ? 0.0f : softmax_exp(init_lse[i] - mx));
    const float row_lse = mx + std::log(sum);
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < sh.P; ++j) si[j] *= inv;
    const float w = init_lse[i] == neg_inf ? 0.0f : softmax_exp(init_lse[i] - row_lse);
    for (int64_t d = 0; d < sh.D; ++d) o[i][d] = init_lse[i] == neg_inf ? 0.0f : w * o[i][d];
    *lse_out[i] = row_lse;
  }
  accumulate4(s, ld, pv, pv_stride, sh.P, sh.D, o);
}
#endif

#ifdef FASTPEFT_PREFIX_QUAD
// Direct mode for the four heads of one GQA group at position r (same visible keys): every prefix column,
// key row and value row loaded serves four query rows. lse: the first row's LSE, lse_stride between heads.
inline void direct_quad(const Shape& sh, const float* const x[4], float* const o[4], float* lse, int64_t lse_stride,
                        const float* pkt, const float* pv, int64_t pv_stride, const float* k, int64_t k_stride,
                        const float* v, int64_t v_stride, int64_t b, int64_t r, float scale, float* s) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t end = sh.seq_end(r), n = sh.P + end, ld = sh.P + sh.Skv;
  scores_packed4(x, pkt, sh.P, sh.D, scale, s, ld);
  scores4(x, k, k_stride, end, sh.D, scale, s + sh.P, ld);
  for (int i = 0; i < 4; ++i) {
    float* si = s + i * ld;
    if (sh.mask != nullptr) {
      for (int64_t j = 0; j < end; ++j) {
        if (!sh.visible(b, j)) si[sh.P + j] = neg_inf;
      }
    }
    const float mx = row_max(si, n);
    const bool nonfinite = nonfinite_max(mx);
    std::fill(o[i], o[i] + sh.D, nonfinite ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
    if (mx == neg_inf || nonfinite) {  // no key at all (zero weights, output 0), or a NaN row
      std::fill(si, si + n, 0.0f);
      lse[i * lse_stride] = mx;
      continue;
    }
    const float sum = exp_sum(si, n, mx);
    lse[i * lse_stride] = mx + std::log(sum);
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) si[j] *= inv;
  }
  accumulate4(s, ld, pv, pv_stride, sh.P, sh.D, o);
  accumulate4(s + sh.P, ld, v, v_stride, end, sh.D, o);
}
#endif

template <typename T>
void forward_kernel(const Shape& sh, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                    const Tensor& pv, const Tensor& out_init, const Tensor& lse_init, Tensor& out, Tensor& lse,
                    T scale) {
  const View4<T> qv(q), kv(k), vv(v), pkv(pk), pvv(pv);
  const bool has_init = out_init.defined();
  const View4<T> oi = has_init ? View4<T>(out_init) : View4<T>(q);
  const T* li = has_init ? lse_init.data_ptr<T>() : nullptr;
  MutView4<T> ov(out);
  T* lv = lse.data_ptr<T>();  // contiguous [B, Hq, Sq]
  const Tensor pk_packed = pk.transpose(2, 3).contiguous();  // [Bp, Hkv, D, P]
  const T* pkt = pk_packed.data_ptr<T>();
  const T neg_inf = -std::numeric_limits<T>::infinity();

  // One query row (b, h, r), s: scratch of P + Skv.
  auto one_row = [&](int64_t b, int64_t h, int64_t r, T* s) {
    const int64_t hkv = h / sh.G, pb = sh.prefix_batched ? b : 0;
    T* orow = ov.row(b, h, r);
    T* lse_out = lv + (b * sh.Hq + h) * sh.Sq + r;
    const int64_t end = sh.seq_end(r);
    const int64_t n = sh.P + end;
    T mx = row_scores(sh, qv.row(b, h, r), pkt + (pb * sh.Hkv + hkv) * sh.D * sh.P, kv.row(b, hkv, 0), kv.s2, b,
                      end, scale, s);
    const T init_lse = has_init ? li[(b * sh.Hq + h) * sh.Sq + r] : neg_inf;
    mx = max_nan(mx, init_lse);
    if (mx == neg_inf || nonfinite_max(mx)) {  // no key at all (output 0), or a NaN row
      std::fill(orow, orow + sh.D, mx == neg_inf ? T(0) : std::numeric_limits<T>::quiet_NaN());
      *lse_out = mx;
      return;
    }
    const T sum = exp_sum(s, n, mx) + (init_lse == neg_inf ? T(0) : softmax_exp(init_lse - mx));
    const T row_lse = mx + std::log(sum);
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    if (init_lse != neg_inf) {
      const T w = softmax_exp(init_lse - row_lse);
      const T* irow = oi.row(b, h, r);
      for (int64_t d = 0; d < sh.D; ++d) orow[d] = w * irow[d];
    } else {
      std::fill(orow, orow + sh.D, T(0));
    }
    accumulate(s, pvv.row(pb, hkv, 0), pvv.s2, sh.P, sh.D, orow);
    accumulate(s + sh.P, vv.row(b, hkv, 0), vv.s2, end, sh.D, orow);
    *lse_out = row_lse;
  };

  // Tasks: (b, block of positions), every head of a position in turn (HF's [B, S, H, D] memory order).
  const int64_t rows_per_task = std::max<int64_t>(1, 64 / sh.Hq);
  const int64_t tasks_per_sample = (sh.Sq + rows_per_task - 1) / rows_per_task;
  [[maybe_unused]] bool quads = false;
#ifdef FASTPEFT_PREFIX_QUAD
  quads = std::is_same_v<T, float> && !sh.with_sequence && sh.P > 0 && (!has_init || out.is_same(out_init));
#endif
  // Too few position blocks for the threads (a decode step): one task per KV head too.
  const int64_t kv_tasks = sh.B * tasks_per_sample >= at::get_num_threads() ? 1 : sh.Hkv;
  const int64_t kv_per_task = sh.Hkv / kv_tasks;
  at::parallel_for(0, sh.B * tasks_per_sample * kv_tasks, 1, [&](int64_t begin, int64_t end_task) {
    std::vector<T> s(4 * (sh.P + sh.Skv));
    for (int64_t task = begin; task < end_task; ++task) {
      const int64_t kv0 = (task % kv_tasks) * kv_per_task;
      const int64_t block = task / kv_tasks;
      const int64_t b = block / tasks_per_sample;
      const int64_t r0 = (block % tasks_per_sample) * rows_per_task;
      const int64_t r1 = std::min(sh.Sq, r0 + rows_per_task);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t hkv = kv0; hkv < kv0 + kv_per_task; ++hkv) {
          int64_t g = 0;
#ifdef FASTPEFT_PREFIX_QUAD
          if constexpr (std::is_same_v<T, float>) {
            const int64_t pb = sh.prefix_batched ? b : 0;
            for (; quads && g + 4 <= sh.G; g += 4) {
              const float* x[4];
              float* o[4];
              float init[4];
              float* lo[4];
              for (int i = 0; i < 4; ++i) {
                const int64_t h = hkv * sh.G + g + i, row = (b * sh.Hq + h) * sh.Sq + r;
                x[i] = qv.row(b, h, r);
                o[i] = ov.row(b, h, r);
                init[i] = has_init ? li[row] : neg_inf;
                lo[i] = lv + row;
              }
              prefix_merge_quad(sh, x, o, init, lo, pkt + (pb * sh.Hkv + hkv) * sh.D * sh.P, pvv.row(pb, hkv, 0),
                                pvv.s2, scale, s.data());
            }
          }
#endif
#ifdef FASTPEFT_PREFIX_QUAD
          if constexpr (std::is_same_v<T, float>) {
            const int64_t pb = sh.prefix_batched ? b : 0;
            for (; sh.with_sequence && g + 4 <= sh.G; g += 4) {
              const float* x[4];
              float* o[4];
              for (int i = 0; i < 4; ++i) {
                x[i] = qv.row(b, hkv * sh.G + g + i, r);
                o[i] = ov.row(b, hkv * sh.G + g + i, r);
              }
              direct_quad(sh, x, o, lv + (b * sh.Hq + hkv * sh.G + g) * sh.Sq + r, sh.Sq,
                          pkt + (pb * sh.Hkv + hkv) * sh.D * sh.P, pvv.row(pb, hkv, 0), pvv.s2, kv.row(b, hkv, 0),
                          kv.s2, vv.row(b, hkv, 0), vv.s2, b, r, scale, s.data());
            }
          }
#endif
          for (; g < sh.G; ++g) one_row(b, hkv * sh.G + g, r, s.data());
        }
      }
    }
  });
}

// Gradients of one (batch, KV head) group: its G query heads' rows. dk, dv, dpk, dpv slices of the group
// are written by this task only, so groups run in parallel without atomics; dpk/dpv are per sample.
template <typename T>
void backward_kernel(const Shape& sh, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& pk, const Tensor& pv, const Tensor& out, const Tensor& lse, Tensor& dq,
                     Tensor& dk, Tensor& dv, Tensor& dpk, Tensor& dpv, T scale, bool need_q, bool need_kv,
                     bool need_prefix, bool add_to_dq) {
  const View4<T> dov(dout), qv(q), kv(k), vv(v), pkv(pk), pvv(pv), ov(out);
  const T* lv = lse.data_ptr<T>();
  const Tensor pk_packed = pk.transpose(2, 3).contiguous(), pv_packed = pv.transpose(2, 3).contiguous();
  const T* pkt = pk_packed.data_ptr<T>();
  const T* pvt = pv_packed.data_ptr<T>();
  Tensor& unused = const_cast<Tensor&>(dout);  // a placeholder view for gradients not asked for
  MutView4<T> dqv(need_q ? dq : unused), dkv(need_kv ? dk : unused), dvv(need_kv ? dv : unused);
  MutView4<T> dpkv(need_prefix ? dpk : unused), dpvv(need_prefix ? dpv : unused);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  [[maybe_unused]] const bool quads = std::is_same_v<T, float> && !sh.with_sequence && sh.P > 0;
  at::parallel_for(0, sh.B * sh.Hkv, 1, [&](int64_t begin, int64_t end_task) {
    std::vector<T> p(4 * (sh.P + sh.Skv)), ds(4 * (sh.P + sh.Skv)), dqrow(sh.D);
    for (int64_t task = begin; task < end_task; ++task) {
      const int64_t b = task / sh.Hkv, hkv = task % sh.Hkv;
      const int64_t pb = sh.prefix_batched ? b : 0;
      const T* pk_rows = pkv.row(pb, hkv, 0);
      const T* pkt_rows = pkt + (pb * sh.Hkv + hkv) * sh.D * sh.P;
      const T* pvt_rows = pvt + (pb * sh.Hkv + hkv) * sh.D * sh.P;
      const T* k_rows = kv.row(b, hkv, 0);
      const T* v_rows = vv.row(b, hkv, 0);
      for (int64_t r = 0; r < sh.Sq; ++r) {  // positions outer: HF's [B, S, H, D] memory order
        int64_t g = 0;
#ifdef FASTPEFT_PREFIX_QUAD
        if constexpr (std::is_same_v<T, float>) {
          for (; quads && g + 4 <= sh.G; g += 4) {
            const float* x[4];
            const float* dor[4];
            float* dqr[4];
            float row_lse[4];
            bool finite = true;
            for (int i = 0; i < 4; ++i) {
              const int64_t h = hkv * sh.G + g + i;
              x[i] = qv.row(b, h, r);
              dor[i] = dov.row(b, h, r);
              dqr[i] = need_q ? dqv.row(b, h, r) : nullptr;
              row_lse[i] = lv[(b * sh.Hq + h) * sh.Sq + r];
              finite = finite && row_lse[i] != neg_inf && !nonfinite_max(row_lse[i]);
            }
            if (!finite) break;  // rows without keys or NaN rows: the one-row path below
            const int64_t ld = sh.P;
            scores_packed4(x, pkt_rows, sh.P, sh.D, scale, p.data(), ld);
            scores_packed4(dor, pvt_rows, sh.P, sh.D, 1.0f, ds.data(), ld);
            for (int i = 0; i < 4; ++i) {
              float* pi = p.data() + i * ld;
              float* dsi = ds.data() + i * ld;
              exp_sum(pi, sh.P, row_lse[i]);
              const float delta = dot(dor[i], ov.row(b, hkv * sh.G + g + i, r), sh.D);
              for (int64_t j = 0; j < sh.P; ++j) dsi[j] = pi[j] * (dsi[j] - delta) * scale;
              if (need_q && !add_to_dq) std::fill(dqr[i], dqr[i] + sh.D, 0.0f);
            }
            if (need_q) accumulate4(ds.data(), ld, pk_rows, pkv.s2, sh.P, sh.D, dqr);
            if (need_prefix) {
              outer4(ds.data(), ld, x, sh.P, sh.D, dpkv.row(b, hkv, 0), dpkv.s2);
              outer4(p.data(), ld, dor, sh.P, sh.D, dpvv.row(b, hkv, 0), dpvv.s2);
            }
          }
        }
#endif
        // Rows one at a time; four heads at a time share the key-gradient updates (one load and store of
        // each dk/dv/dprefix row per four query rows).
        [[maybe_unused]] const int64_t ld = sh.P + sh.Skv;
        auto row_grads = [&](int64_t h, T* pr, T* dsr) -> bool {
          const T row_lse = lv[(b * sh.Hq + h) * sh.Sq + r];
          const int64_t end = sh.seq_end(r);
          const int64_t n = sh.P + end;
          if (row_lse == neg_inf) {  // a row that saw no key has no gradient
            if (need_q && !add_to_dq) std::fill(dqv.row(b, h, r), dqv.row(b, h, r) + sh.D, T(0));
            std::fill(pr, pr + n, T(0));
            std::fill(dsr, dsr + n, T(0));
            return false;
          }
          const T* qrow = qv.row(b, h, r);
          const T* dorow = dov.row(b, h, r);
          row_scores(sh, qrow, pkt_rows, k_rows, kv.s2, b, end, scale, pr);
          if (nonfinite_max(row_lse)) {  // a NaN row (LSE NaN or +inf): every visible key's probability is NaN
            for (int64_t j = 0; j < n; ++j)
              pr[j] = j < sh.P || sh.visible(b, j - sh.P) ? std::numeric_limits<T>::quiet_NaN() : T(0);
          } else {
            exp_sum(pr, n, row_lse);  // the probabilities
          }
          const T delta = dot(dorow, ov.row(b, h, r), sh.D);
          scores_packed(dorow, pvt_rows, sh.P, sh.D, T(1), dsr);
          scores(dorow, v_rows, vv.s2, end, sh.D, T(1), dsr + sh.P);
          for (int64_t j = 0; j < n; ++j) dsr[j] = pr[j] * (dsr[j] - delta) * scale;
          if (need_q) {
            if (add_to_dq) {
              std::copy(dqv.row(b, h, r), dqv.row(b, h, r) + sh.D, dqrow.begin());
            } else {
              std::fill(dqrow.begin(), dqrow.end(), T(0));
            }
            accumulate(dsr, pk_rows, pkv.s2, sh.P, sh.D, dqrow.data());
            accumulate(dsr + sh.P, k_rows, kv.s2, end, sh.D, dqrow.data());
            std::copy(dqrow.begin(), dqrow.end(), dqv.row(b, h, r));
          }
          return true;
        };
#ifdef FASTPEFT_PREFIX_QUAD
        if constexpr (std::is_same_v<T, float>) {
          const int64_t end = sh.seq_end(r);
          for (; sh.with_sequence && g + 4 <= sh.G; g += 4) {
            const float* x[4];
            const float* dor[4];
            for (int i = 0; i < 4; ++i) {
              const int64_t h = hkv * sh.G + g + i;
              x[i] = qv.row(b, h, r);
              dor[i] = dov.row(b, h, r);
              row_grads(h, p.data() + i * ld, ds.data() + i * ld);
            }
            if (need_prefix) {
              outer4(ds.data(), ld, x, sh.P, sh.D, dpkv.row(b, hkv, 0), dpkv.s2);
              outer4(p.data(), ld, dor, sh.P, sh.D, dpvv.row(b, hkv, 0), dpvv.s2);
            }
            if (need_kv) {
              outer4(ds.data() + sh.P, ld, x, end, sh.D, dkv.row(b, hkv, 0), dkv.s2);
              outer4(p.data() + sh.P, ld, dor, end, sh.D, dvv.row(b, hkv, 0), dvv.s2);
            }
          }
        }
#endif
        for (; g < sh.G; ++g) {
          const int64_t h = hkv * sh.G + g;
          if (!row_grads(h, p.data(), ds.data())) continue;
          const T* qrow = qv.row(b, h, r);
          const T* dorow = dov.row(b, h, r);
          const int64_t end = sh.seq_end(r);
          if (need_prefix) {
            for (int64_t j = 0; j < sh.P; ++j) {
              axpy(ds[j], qrow, dpkv.row(b, hkv, j), sh.D);
              axpy(p[j], dorow, dpvv.row(b, hkv, j), sh.D);
            }
          }
          if (need_kv) {
            for (int64_t j = 0; j < end; ++j) {
              if (p[sh.P + j] == T(0)) continue;
              axpy(ds[sh.P + j], qrow, dkv.row(b, hkv, j), sh.D);
              axpy(p[sh.P + j], dorow, dvv.row(b, hkv, j), sh.D);
            }
          }
        }
      }
    }
  });
}

void check_last_stride(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D, got ", t.dim(), " dimensions");
  TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, name, " must have stride 1 in its last dimension");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
}

Shape make_shape(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                 const std::optional<Tensor>& mask, bool causal, bool with_sequence) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&pk, "prefix_k"}, {&pv, "prefix_v"}}) {
    check_last_stride(*t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type());
  }
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "prefix attention's direct CPU kernel takes float32 or float64, got ", q.scalar_type());
  Shape sh{};
  sh.B = q.size(0);
  sh.Hq = q.size(1);
  sh.Sq = q.size(2);
  sh.D = q.size(3);
  sh.Hkv = k.size(1);
  sh.Skv = k.size(2);
  sh.P = pk.size(2);
  TORCH_CHECK_VALUE(sh.Hkv > 0 && sh.Hq % sh.Hkv == 0, "q's heads must be a multiple of k's");
  TORCH_CHECK_VALUE(k.size(0) == sh.B && k.size(3) == sh.D && v.sizes() == k.sizes(), "k, v: bad shape");
  TORCH_CHECK_VALUE((pk.size(0) == 1 || pk.size(0) == sh.B) && pk.size(1) == sh.Hkv && pk.size(3) == sh.D &&
                        pv.sizes() == pk.sizes(), "prefix_k, prefix_v: bad shape");
  sh.G = sh.Hq / sh.Hkv;
  sh.causal = causal;
  sh.with_sequence = with_sequence;
  sh.prefix_batched = pk.size(0) != 1;
  sh.mask = nullptr;
  sh.mask_stride = 0;
  if (mask.has_value() && with_sequence) {
    const Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "key_padding_mask must be bool");
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == sh.B && m.size(1) == sh.Skv && m.stride(1) == 1,
                      "key_padding_mask must be [B, Skv] with stride 1 in its last dimension");
    sh.mask = m.data_ptr<bool>();
    sh.mask_stride = m.stride(0);
  }
  return sh;
}

std::tuple<Tensor, Tensor> prefix_attention_direct_forward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k, const Tensor& prefix_v,
    const std::optional<Tensor>& key_padding_mask, bool causal, double scale, bool with_sequence,
    const std::optional<Tensor>& out_init, const std::optional<Tensor>& lse_init) {
  const Shape sh = make_shape(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, with_sequence);
  Tensor init_out, init_lse;
  if (out_init.has_value()) {
    TORCH_CHECK_VALUE(lse_init.has_value(), "out_init needs lse_init");
    init_out = *out_init;
    check_last_stride(init_out, "out_init");
    TORCH_CHECK_VALUE(init_out.sizes() == q.sizes() && init_out.scalar_type() == q.scalar_type(),
                      "out_init must have q's shape and dtype");
    init_lse = lse_init->contiguous();
    TORCH_CHECK_VALUE(init_lse.dim() == 3 && init_lse.size(0) == sh.B && init_lse.size(1) == sh.Hq &&
                          init_lse.size(2) == sh.Sq && init_lse.scalar_type() == q.scalar_type(),
                      "lse_init must be [B, Hq, Sq] in q's dtype");
  }
  // The prefix-only merge updates out_init in place (no fresh output to fault in, one read-modify-write of
  // each row: the merge is bound by memory traffic at long sequences).
  Tensor out = init_out.defined() && !with_sequence ? init_out : new_like(q);
  Tensor lse = new_like(at::empty({sh.B, sh.Hq, sh.Sq}, q.options()));
  if (q.numel() == 0) return {out, lse.fill_(-std::numeric_limits<double>::infinity())};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_direct_forward", [&] {
    forward_kernel<scalar_t>(sh, q, k, v, prefix_k, prefix_v, init_out, init_lse, out, lse,
                             static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefix_attention_direct_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
    const Tensor& prefix_v, const std::optional<Tensor>& key_padding_mask, const Tensor& out, const Tensor& lse,
    bool causal, double scale, bool with_sequence, bool need_q, bool need_kv, bool need_prefix,
    const std::optional<Tensor>& dq_init) {
  const Shape sh = make_shape(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, with_sequence);
  check_last_stride(dout, "dout");
  check_last_stride(out, "out");
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape");
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                       lse.scalar_type() == q.scalar_type(), "dout, out and lse must have q's dtype");
  const Tensor lse_c = lse.contiguous();
  TORCH_CHECK_VALUE(lse_c.dim() == 3 && lse_c.size(0) == sh.B && lse_c.size(1) == sh.Hq && lse_c.size(2) == sh.Sq,
                    "lse must be [B, Hq, Sq]");
  need_kv = need_kv && with_sequence;
  // dq_init (the flash backward's dq in the merged mode) is added to in place: no second dq and no add pass.
  const bool add_to_dq = need_q && dq_init.has_value();
  if (add_to_dq) {
    check_last_stride(*dq_init, "dq_init");
    TORCH_CHECK_VALUE(dq_init->sizes() == q.sizes() && dq_init->scalar_type() == q.scalar_type(),
                      "dq_init must have q's shape and dtype");
  }
  Tensor dq = add_to_dq ? *dq_init : need_q ? new_like(q) : Tensor();
  Tensor dk = need_kv ? at::zeros_like(k) : Tensor();  // k's strides: the op returns it without a copy
  Tensor dv = need_kv ? at::zeros_like(v) : Tensor();
  // Per-sample prefix gradients; the caller sums them over the batch for a shared prefix.
  Tensor dpk = need_prefix ? at::zeros({sh.B, sh.Hkv, sh.P, sh.D}, q.options()) : Tensor();
  Tensor dpv = need_prefix ? at::zeros({sh.B, sh.Hkv, sh.P, sh.D}, q.options()) : Tensor();
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_direct_backward", [&] {
      backward_kernel<scalar_t>(sh, dout, q, k, v, prefix_k, prefix_v, out, lse_c, dq, dk, dv, dpk, dpv,
                                static_cast<scalar_t>(scale), need_q, need_kv, need_prefix, add_to_dq);
    });
  } else if (need_q && !add_to_dq) {
    dq.zero_();
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_native, m) {
  m.def("prefix_attention_direct_forward(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor? key_padding_mask, bool causal, float scale, bool with_sequence, Tensor(a!)? out_init, "
        "Tensor? lse_init) -> (Tensor, Tensor)");
  m.def("prefix_attention_direct_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
        "Tensor prefix_v, Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float scale, "
        "bool with_sequence, bool need_q, bool need_kv, bool need_prefix, Tensor(a!)? dq_init) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("prefix_attention_poison_outputs(bool on) -> bool", &prefix_attention_poison_outputs);
}

TORCH_LIBRARY_IMPL(fastpeft_native, CPU, m) {
  m.impl("prefix_attention_direct_forward", &prefix_attention_direct_forward);
  m.impl("prefix_attention_direct_backward", &prefix_attention_direct_backward);
}

}  // namespace fastpeft
