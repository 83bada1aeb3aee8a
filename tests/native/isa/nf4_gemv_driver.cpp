// Test driver (tests/native/test_nf4_gemv_isa.py): runs the fp32 NF4 GEMVs of csrc/cpu/nf4_gemv.cpp, compiled
// without torch for one instruction set, on raw float32/uint8 files, so that the AVX2 and scalar code paths are
// tested on a machine whose native build takes the AVX-512 path.
//
//   nf4_gemv_driver --isa                 prints the decode path this binary was compiled with
//   nf4_gemv_driver DIR M N K BLOCKSIZE   reads DIR/{x,dy,bias,packed,absmax}.bin, writes DIR/{y,dx}.bin
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/nf4_cpu_kernels.h"
#include "cpu/nf4_simd.h"

namespace {

template <typename T>
std::vector<T> read_file(const std::string& path, std::size_t count) {
  std::vector<T> data(count);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(data.data(), sizeof(T), count, f) != count) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", count, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return data;
}

void write_file(const std::string& path, const std::vector<float>& data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data.data(), sizeof(float), data.size(), f) != data.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--isa") == 0) {
#if defined(FASTPEFT_NF4_AVX512)
    std::puts("avx512");
#elif defined(FASTPEFT_NF4_AVX2)
    std::puts("avx2");
#else
    std::puts("scalar");
#endif
    return 0;
  }
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s DIR M N K BLOCKSIZE | --isa\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const std::int64_t M = std::atoll(argv[2]), N = std::atoll(argv[3]), K = std::atoll(argv[4]);
  const std::int64_t blocksize = std::atoll(argv[5]);
  const auto x = read_file<float>(dir + "/x.bin", M * K);
  const auto dy = read_file<float>(dir + "/dy.bin", M * N);
  const auto bias = read_file<float>(dir + "/bias.bin", N);
  const auto packed = read_file<std::uint8_t>(dir + "/packed.bin", N * K / 2);
  const auto absmax = read_file<float>(dir + "/absmax.bin", N * K / blocksize);
  std::vector<float> y(M * N, -12345.0f), dx(M * K, -12345.0f);
  fastpeft::cpu::nf4_gemv(x.data(), M, packed.data(), absmax.data(), N, K, blocksize, bias.data(), y.data());
  if (M <= fastpeft::cpu::kMaxGemvTransposedRows)
    fastpeft::cpu::nf4_gemv_transposed(dy.data(), M, packed.data(), absmax.data(), N, K, blocksize, dx.data());
  write_file(dir + "/y.bin", y);
  write_file(dir + "/dx.bin", dx);
  return 0;
}
