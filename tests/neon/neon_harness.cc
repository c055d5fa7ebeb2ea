// Bit-exactness harness for the NEON paths of the qlite CPU kernels
// (qlite/kernels/cpu_kernels_neon.h): every variant (plain NEON, dotprod,
// i8mm) x int8 / int16 activations x int8 / int4 weights x K tiles x row
// and column tails, against the scalar reference RangeScalar. Built and run
// by tests/test_neon_kernels.py with an aarch64 cross compiler under
// qemu-aarch64 -cpu max; prints one line per variant and exits 1 on any
// mismatch.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu_kernels_core.h"
#include "cpu_kernels_neon.h"

using qlite_kernels::Problem;

namespace {

struct Case {
  int64_t m, k, n, t;
  bool int4;
};

// Same shapes as tests/test_kernels.py's _KERNEL_CASES (SIMD-sized K tiles).
const Case kCases[] = {
    {1, 512, 256, 1, false}, {2, 2048, 260, 1, false}, {3, 96, 40, 1, false},
    {5, 512, 256, 8, false}, {16, 256, 64, 2, false},  {1, 512, 256, 1, true},
    {2, 1024, 130, 4, true}, {7, 128, 12, 2, true},    {70, 256, 36, 1, false},
    {13, 192, 20, 3, false}, {64, 512, 64, 2, true},   {9, 256, 8, 1, true},
    {5, 192, 12, 1, true},   {6, 64, 8, 1, true},      {17, 96, 70, 1, false},
    {40, 256, 130, 4, false}, {33, 512, 100, 2, true}, {11, 64, 9, 1, false}};

int16_t Int16ActMax(int64_t k_tile, int bits) {
  const int64_t wmax = int64_t{1} << (bits - 1);
  const int64_t v = (int64_t{2147483647}) / (k_tile * wmax);
  return static_cast<int16_t>(v < 32767 ? v : 32767);
}

// Returns the number of mismatching outputs of `variant` on case c.
int64_t RunCase(const Case& c, bool int16_act, int variant, uint32_t seed) {
  std::mt19937 rng(seed);
  const int bits = c.int4 ? 4 : 8;
  const int hi = c.int4 ? 7 : 127;
  std::uniform_int_distribution<int> wd(-hi - 1, hi);
  std::vector<int8_t> w(c.n * c.k);
  for (auto& v : w) v = static_cast<int8_t>(wd(rng));
  const int64_t tk = c.k / c.t;
  std::vector<int16_t> a16;
  std::vector<int8_t> a8;
  if (int16_act) {
    const int16_t amax = Int16ActMax(tk, bits);
    std::uniform_int_distribution<int> ad(-amax, amax);
    a16.resize(c.m * c.k);
    for (auto& v : a16) v = static_cast<int16_t>(ad(rng));
    for (int64_t i = 0; i < tk; ++i) a16[i] = amax;   // overflow worst case
    if (!c.int4) for (int64_t i = 0; i < tk; ++i) w[i] = -128;
  } else {
    std::uniform_int_distribution<int> ad(-128, 127);
    a8.resize(c.m * c.k);
    for (auto& v : a8) v = static_cast<int8_t>(ad(rng));
    for (int64_t i = 0; i < tk; ++i) a8[i] = -128;
    if (!c.int4) for (int64_t i = 0; i < tk; ++i) w[i] = -128;
  }
  std::vector<uint8_t> wb;
  if (c.int4) {   // pack_int4_nk layout
    wb.assign(c.n * c.k / 2, 0);
    for (int64_t r = 0; r < c.n; ++r)
      for (int64_t b = 0; b < c.k / 64; ++b)
        for (int i = 0; i < 32; ++i) {
          const uint8_t lo = static_cast<uint8_t>(w[r * c.k + b * 64 + i]) & 0xF;
          const uint8_t hi4 =
              static_cast<uint8_t>(w[r * c.k + b * 64 + 32 + i]) & 0xF;
          wb[r * c.k / 2 + b * 32 + i] = static_cast<uint8_t>(lo | (hi4 << 4));
        }
  } else {
    wb.resize(w.size());
    std::memcpy(wb.data(), w.data(), w.size());
  }
  Problem p{};
  p.a = int16_act ? a16.data() : nullptr;
  p.a8 = int16_act ? nullptr : a8.data();
  p.w = wb.data();
  p.m = c.m;
  p.k = c.k;
  p.n = c.n;
  p.t = c.t;
  p.int4 = c.int4;
  std::vector<int32_t> ref(c.m * c.t * c.n), got(c.m * c.t * c.n, 0x5a5a5a5a);
  p.out = ref.data();
  qlite_kernels::RangeScalar(p, 0, c.n);
  p.out = got.data();
  // two column ranges, as the thread split does (multiples of 4)
  const int64_t mid = (c.n / 2) / 4 * 4;
  qlite_kernels::RangeNeon(p, variant, 0, mid);
  qlite_kernels::RangeNeon(p, variant, mid, c.n);
  int64_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) bad += ref[i] != got[i];
  return bad;
}

}  // namespace

int main() {
  static const char* kNames[] = {"neon", "neon_dotprod", "neon_i8mm"};
  std::printf("cpu: dotprod=%d i8mm=%d\n", qlite_kernels::NeonHasDotprod(),
              qlite_kernels::NeonHasI8mm());
  int64_t total_bad = 0;
  for (int variant = 0; variant < 3; ++variant) {
    if (variant > qlite_kernels::NeonBestVariant()) {
      std::printf("%s: skipped (this CPU lacks it)\n", kNames[variant]);
      continue;
    }
    int64_t cases = 0, bad_cases = 0;
    for (const Case& c : kCases)
      for (int act16 = 0; act16 < 2; ++act16) {
        const int64_t bad = RunCase(c, act16 != 0, variant,
                                    static_cast<uint32_t>(c.m * c.k + c.n));
        ++cases;
        if (bad) {
          ++bad_cases;
          std::printf("MISMATCH %s m=%lld k=%lld n=%lld t=%lld int4=%d "
                      "int16_act=%d: %lld outputs\n", kNames[variant],
                      static_cast<long long>(c.m), static_cast<long long>(c.k),
                      static_cast<long long>(c.n), static_cast<long long>(c.t),
                      c.int4, act16, static_cast<long long>(bad));
        }
      }
    std::printf("%s: %lld cases, %lld mismatching\n", kNames[variant],
                static_cast<long long>(cases),
                static_cast<long long>(bad_cases));
    total_bad += bad_cases;
  }
  return total_bad ? 1 : 0;
}
