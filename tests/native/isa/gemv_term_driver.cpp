// Driver for tests/native/test_nf4_gemv_term_header.py: the shared header's GEMV terms
// (nf4::gemv_byte_terms, what the CUDA decode GEMV sums) on the host, no torch.
//
//   gemv_term_driver DIR NBYTES BLOCKSIZE {fp32|bf16}
// reads DIR/packed.bin (uint8), DIR/absmax.bin and DIR/x.bin (fp32), writes DIR/terms.bin: one fp32
// per byte, the sum of its two elements' terms with the weight rounded to fp32 or bf16.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fastpeft/nf4_codec.h"

namespace {

struct RoundFp32 {
  float operator()(float v) const { return v; }
};

// fp32 -> bf16 (round to nearest even) -> fp32; NaN stays NaN.
struct RoundBf16 {
  float operator()(float v) const {
    std::uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return v;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    bits &= 0xffff0000u;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
};

template <typename T>
std::vector<T> read(const std::string& path, std::size_t n) {
  std::vector<T> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(v.data(), sizeof(T), n, f) != n) std::exit(2);
  std::fclose(f);
  return v;
}

template <typename Round>
void terms(const std::vector<std::uint8_t>& packed, const std::vector<float>& absmax, const std::vector<float>& x,
           long blocksize, std::vector<float>& out) {
  float table[fastpeft::nf4::kNumCodes];
  for (int i = 0; i < fastpeft::nf4::kNumCodes; ++i) table[i] = fastpeft::nf4::code_value(i);
  for (std::size_t j = 0; j < packed.size(); ++j) {
    out[j] = fastpeft::nf4::gemv_byte_terms(table, packed[j], absmax[2 * j / blocksize], x[2 * j], x[2 * j + 1],
                                            Round());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) return 1;
  const std::string dir = argv[1];
  const std::size_t nbytes = std::strtoul(argv[2], nullptr, 10);
  const long blocksize = std::strtol(argv[3], nullptr, 10);
  const auto packed = read<std::uint8_t>(dir + "/packed.bin", nbytes);
  const auto absmax = read<float>(dir + "/absmax.bin", 2 * nbytes / blocksize);
  const auto x = read<float>(dir + "/x.bin", 2 * nbytes);
  std::vector<float> out(nbytes);
  if (std::string(argv[4]) == "bf16") {
    terms<RoundBf16>(packed, absmax, x, blocksize, out);
  } else {
    terms<RoundFp32>(packed, absmax, x, blocksize, out);
  }
  FILE* f = std::fopen((dir + "/terms.bin").c_str(), "wb");
  std::fwrite(out.data(), sizeof(float), out.size(), f);
  std::fclose(f);
  return 0;
}
