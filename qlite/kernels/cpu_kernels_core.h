// Portable core of the qlite CPU kernels (qlite/kernels/cpu_kernels.cc):
// the problem description and the scalar reference path. No Python, XLA or
// SIMD headers, so that a standalone harness (tests/neon/neon_harness.cc,
// cross-compiled for aarch64 and run under qemu) can include it together
// with one SIMD body (cpu_kernels_neon.inc) and check it bit-exact against
// RangeScalar.

#ifndef QLITE_KERNELS_CPU_KERNELS_CORE_H_
#define QLITE_KERNELS_CPU_KERNELS_CORE_H_

#include <cstdint>
#include <vector>

namespace qlite_kernels {

struct Problem {
  const int16_t* a;   // [M, K] int16 (int8 activations are widened once per
                      // call for the dot forms), or null
  const uint8_t* au8; // [M, K] int8 activations + 128 (VNNI u8 path), or null
  const int8_t* a8;   // [M, K] int8 activations (GEMM form, NEON), or null
  const int32_t* asum;  // [M, T] sums of a8 per K tile (GEMM form)
  const uint8_t* w;   // [N, K] int8, or [N, K/2] packed int4
  const uint8_t* panels;  // VNNI u8 panels packed once ([ceil(N/64), 64 K]
                          // bytes, qlite_pack_u8_panels), or null: the GEMM
                          // form then packs each panel per call
  int32_t* out;       // [M, T, N]
  int64_t m, k, n, t;
  bool int4;
};

// int4 packing (qlite/kernels/cpu.py: pack_int4_nk): per row, in blocks of
// 64 values along K, byte i (0..31) of the block holds value i in its low
// nibble and value i + 32 in its high nibble (two's complement nibbles).
inline int8_t Nibble(uint8_t byte, bool high) {
  int v = high ? (byte >> 4) : (byte & 0xF);
  return static_cast<int8_t>(v >= 8 ? v - 16 : v);
}

inline int8_t WeightAt(const Problem& p, int64_t row, int64_t kk) {
  if (!p.int4) return static_cast<int8_t>(p.w[row * p.k + kk]);
  const uint8_t* r = p.w + row * (p.k / 2);
  int64_t block = kk / 64, i = kk % 64;
  return Nibble(r[block * 32 + (i % 32)], i >= 32);
}

// Output columns [n0, n1) of every row over activations `a` (int16 or
// int8 rows): one weight row at a time (int4 unpacked once into `row`),
// plain loops the compiler may vectorize for the baseline instruction set.
template <typename A>
inline void RangeScalarT(const Problem& p, const A* a, int64_t n0,
                         int64_t n1) {
  const int64_t tk = p.k / p.t;
  std::vector<int8_t> row(p.int4 ? p.k : 0);
  for (int64_t j = n0; j < n1; ++j) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w) + j * p.k;
    if (p.int4) {
      for (int64_t kk = 0; kk < p.k; ++kk) row[kk] = WeightAt(p, j, kk);
      w = row.data();
    }
    for (int64_t mi = 0; mi < p.m; ++mi) {
      const A* ar = a + mi * p.k;
      for (int64_t ti = 0; ti < p.t; ++ti) {
        int32_t acc = 0;
        for (int64_t kk = ti * tk; kk < (ti + 1) * tk; ++kk)
          acc += static_cast<int32_t>(ar[kk]) * static_cast<int32_t>(w[kk]);
        p.out[(mi * p.t + ti) * p.n + j] = acc;
      }
    }
  }
}

// The reference every SIMD path must match exactly (and the tail of the
// paths that work in blocks of 4 columns): the int16 rows when present,
// else the int8 ones.
inline void RangeScalar(const Problem& p, int64_t n0, int64_t n1) {
  if (p.a != nullptr) RangeScalarT(p, p.a, n0, n1);
  else RangeScalarT(p, p.a8, n0, n1);
}

// Row blocking shared by every SIMD form: blocks of R rows over [c0, c1),
// the last (shorter) block through the same table of instantiations,
// table[rows](args..., m0), so the tail rows run the same code as the rest.
template <int R, typename Fn, typename... Args>
inline void RowBlocks(const Fn (&table)[R + 1], int64_t c0, int64_t c1,
                      const Args&... args) {
  int64_t m0 = c0;
  for (; m0 + R <= c1; m0 += R) table[R](args..., m0);
  if (m0 < c1) table[c1 - m0](args..., m0);
}

// True when K tiles suit the SIMD paths (32 int8 / 64 int4 values).
inline bool SimdShapeOk(const Problem& p) {
  const int64_t tk = p.k / p.t;
  return p.int4 ? (tk % 64 == 0) : (tk % 32 == 0);
}

}  // namespace qlite_kernels

#endif  // QLITE_KERNELS_CPU_KERNELS_CORE_H_
