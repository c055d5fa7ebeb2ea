// qlite CPU kernels behind jax.ffi (XLA typed FFI, api_version 4).
//
// Integer matmuls with the weight stored [N, K] (contracting the last dims),
// int32 accumulation, exact:
//
//   qlite_i8_dot_nk : a s8|s16[M, K] x w s8[N, K]            -> s32[M, T, N]
//   qlite_i4_dot_nk : a s8|s16[M, K] x w u8[N, K/2] (packed)  -> s32[M, T, N]
//
// int16 activations serve weight-only dots (one int16 row per activation
// row instead of two int8 digits); the caller picks the activation bits so
// that sums cannot overflow int32 (K_tile * max|a| * 127 < 2^31).
//
// T is the number of tiles along K (sub-channel scales; T = 1 per channel):
// out[m, t, n] = sum over k in tile t of a[m, k] * w[n, k].
//
// Why: XLA:CPU's int8 dot at M <= 8 is compute-bound (~1 ms for a 2048 x
// 2048 layer, it repacks the weight every call), while the layer only has to
// stream 4 MiB (int8) / 2 MiB (int4) of weights, and at larger M it reaches
// only ~1.2x f32. Two forms:
//   dot form (cpu_kernels_avx512.inc, small M): each weight byte read once
//     per call, int4 nibbles unpacked in registers, one accumulator per
//     (row, output) reduced horizontally;
//   GEMM form (cpu_kernels_gemm.inc, M >= 16 int8 / 128 int16 rows): the
//     weight repacked per call into 64-column VNNI panels, activations
//     broadcast, 16 outputs per accumulator.
// Both split N (or, for one panel, M) over XLA's intra-op thread pool.
//
// int4 packing (see qlite/kernels/cpu.py: pack_int4_nk): per row, in blocks
// of 64 values along K, byte i (0..31) of the block holds value i in its low
// nibble and value i + 32 in its high nibble (two's complement nibbles).
//
// Instruction-set families (the FFI attribute `isa`, chosen by
// qlite/kernels/cpu.py): 0 scalar, 1 AVX2 (vpmaddwd), 2 AVX-VNNI (256-bit
// vpdpwssd), 3 AVX-512BW, 4 AVX-512 VNNI (dot forms + GEMM form), 5 NEON
// (aarch64: vmlal / sdot / smmla, cpu_kernels_neon.h); -1 = the best this
// CPU supports. A family the CPU lacks is refused with an error (never an
// illegal instruction). Every path gives the same exact int32 sums as the
// portable scalar path (cpu_kernels_core.h). The module's isa_counts()
// reports how many calls took each path, cpu_isa() the best family,
// cpu_features() the CPU features read at run time.
//
// The SIMD code uses GCC / Clang syntax (function target attributes,
// __builtin_cpu_supports, inline asm): it is compiled only under
// __GNUC__; other compilers (MSVC) build the scalar path alone.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_kernels_core.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>
#define QLITE_X86 1
#endif
#if defined(__aarch64__) && defined(__GNUC__)
#include "cpu_kernels_neon.h"
#define QLITE_ARM 1
#endif

namespace ffi = xla::ffi;

namespace qlite_kernels {
namespace {

// Activation rows from which the VNNI GEMM form (packed weight panels) is
// used, for int8 and for int16 activations. Measured (CPU time per call,
// 768 x 768 and 2048 x 2048 layers): int8 GEMM beats the dot form from 16
// rows (M=16: 0.10 vs 0.13 ms; M=64: 0.19 vs 0.38 ms); the int16 panel is
// twice the bytes to pack, so int16 only gains from 128-256 rows (M=128
// 0.52 vs 0.60 ms, M=256 0.96 vs 1.18 ms). QLITE_CPU_KERNELS_GEMM_M
// overrides both (for measuring and testing).
const int64_t kGemmEnvM = [] {
  const char* e = std::getenv("QLITE_CPU_KERNELS_GEMM_M");
  return e == nullptr ? int64_t{0} : static_cast<int64_t>(std::atoll(e));
}();
int64_t GemmMinM(bool int8_act) {
  if (kGemmEnvM > 0) return kGemmEnvM;
  return int8_act ? 16 : 128;
}

#ifdef QLITE_X86
// --------------------------------------------------------------- AVX-512 --
// 4 weight rows (outputs) x RM activation rows per step, over int16
// activations; 32 (int8) or 64 (int4) K values per step. Weights are
// sign-extended to int16 in registers; products are summed in int32 pairs:
// vpdpwssd with AVX512-VNNI, else vpmaddwd + vpaddd (AVX-512BW). At small M
// the loop is memory-bound (both forms measure alike); at M >= 16 it is
// compute-bound and the fused VNNI form is what makes it beat f32.
// Software prefetch distance (bytes ahead in each weight row): 512 measured
// best of 0 / 256 / 512 / 1024 / 2048 (DRAM-cold 8192 x 2048: 5.6 -> 7.6 GB/s).
constexpr int kPrefetch = 512;

// Rows per register block: 6 x 4 accumulators + 4 weights + 1 activation
// fit the 32 zmm registers.
constexpr int kRows = 6;
// Activation rows from which weight rows are widened once per block
// (QLITE_CPU_KERNELS_WIDEN_M overrides it, for measuring).
const int64_t kWidenMinM = [] {
  const char* e = std::getenv("QLITE_CPU_KERNELS_WIDEN_M");
  return e == nullptr ? int64_t{8} : static_cast<int64_t>(std::atoll(e));
}();

// Activation rows per pass over the weight columns. Short rows (small K)
// are too short for the hardware prefetcher to stream them from L2, so
// rows are taken in chunks whose activations (row_bytes each) fit ~32 KiB
// of L1, when that still gives >= 24 rows to reuse each weight block;
// otherwise all rows in one pass (each weight block stays in L1 while the
// long activation rows stream). Measured (int8, M=512, 2 threads):
// 768 x 3072 16.0 -> 10.4 ms (f32 17.7); 3072 x 768 chunks of 6 rows were
// slower (11.2 -> 13.5 ms), hence the 24-row floor.
int64_t ChunkRows(int64_t m, int64_t row_bytes) {
  int64_t rows = (int64_t{32} << 10) / std::max<int64_t>(1, row_bytes);
  rows = rows / kRows * kRows;
  return rows < 24 ? m : std::min(m, rows);
}

namespace bw {
#define QLITE_TGT __attribute__((target("avx512f,avx512bw")))
#define QLITE_MADD(acc, x, w) \
  _mm512_add_epi32(acc, _mm512_madd_epi16(x, w))
#include "cpu_kernels_avx512.inc"
#undef QLITE_TGT
#undef QLITE_MADD
}  // namespace bw

namespace vnni {
#define QLITE_TGT __attribute__((target("avx512f,avx512bw,avx512vnni")))
// vpdpwssd / vpdpbusd as inline asm: with GCC 12's intrinsics, the
// accumulator arrays of the dot form were kept on the stack and every
// accumulator reloaded and spilled around each instruction (measured ~2x
// slower; 2048 x 2048 int16, M=8).
QLITE_TGT inline __m512i DpwssdAsm(__m512i acc, __m512i x, __m512i w) {
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}
// acc += u8(x) . s8(w), 4 products per int32 lane
QLITE_TGT inline __m512i DpbusdAsm(__m512i acc, __m512i x, __m512i w) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}
#define QLITE_MADD(acc, x, w) DpwssdAsm(acc, x, w)
#include "cpu_kernels_avx512.inc"
#undef QLITE_TGT
#undef QLITE_MADD

#define QLITE_TGT __attribute__((target("avx512f,avx512bw,avx512vnni")))
#include "cpu_kernels_gemm.inc"
#undef QLITE_TGT

// int8 activations: vpdpbusd multiplies unsigned by signed bytes, 4 products
// per int32 lane (twice the int16 form's rate). Activations are stored
// shifted to unsigned (a + 128); the shift is taken back per output with the
// weight row sums: sum (a + 128) w = sum a w + 128 sum w. int4 weights are
// unpacked to int8 once per block of 4 rows.
#define QLITE_TGT __attribute__((target("avx512f,avx512bw,avx512vnni")))
QLITE_TGT void Rows4I8(const Problem& p, int64_t j, int8_t* buf,
                       const int8_t* rows[4]) {
  if (!p.int4) {
    for (int c = 0; c < 4; ++c)
      rows[c] = reinterpret_cast<const int8_t*>(p.w + (j + c) * p.k);
    return;
  }
  for (int c = 0; c < 4; ++c) {
    int8_t* dst = buf + c * p.k;
    UnpackI4Row(p.w + (j + c) * (p.k / 2), dst, p.k);
    rows[c] = dst;
  }
}

template <int RM>
QLITE_TGT void Block4U8(const Problem& p, const int8_t* const* w,
                               const int32_t* wsum, int64_t j, int64_t m0) {
  const int64_t tk = p.k / p.t;
  for (int64_t ti = 0; ti < p.t; ++ti) {
    __m512i acc[RM][4];
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_si512();
    for (int64_t kk = ti * tk; kk < (ti + 1) * tk; kk += 64) {
      __m512i wv[4];
      for (int c = 0; c < 4; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w[c] + kk) + kPrefetch, _MM_HINT_T0);
      for (int c = 0; c < 4; ++c) wv[c] = _mm512_loadu_si512(w[c] + kk);
      for (int r = 0; r < RM; ++r) {
        __m512i xv = _mm512_loadu_si512(p.au8 + (m0 + r) * p.k + kk);
        for (int c = 0; c < 4; ++c)
          acc[r][c] = DpbusdAsm(acc[r][c], xv, wv[c]);
      }
    }
    const __m128i shift = _mm_slli_epi32(
        _mm_setr_epi32(wsum[0 * p.t + ti], wsum[1 * p.t + ti],
                       wsum[2 * p.t + ti], wsum[3 * p.t + ti]), 7);
    for (int r = 0; r < RM; ++r)
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(p.out + ((m0 + r) * p.t + ti) * p.n + j),
          _mm_sub_epi32(Reduce4(acc[r]), shift));
  }
}

using U8BlockFn = void (*)(const Problem&, const int8_t* const*,
                          const int32_t*, int64_t, int64_t);
constexpr U8BlockFn kU8Blocks[kRows + 1] = {
    nullptr, &Block4U8<1>, &Block4U8<2>, &Block4U8<3>, &Block4U8<4>,
    &Block4U8<5>, &Block4U8<6>};

QLITE_TGT void RangeU8(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t tk = p.k / p.t;
  std::vector<int8_t> buf(p.int4 ? 4 * p.k : 0);
  std::vector<int32_t> wsum(4 * p.t);
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t mc = ChunkRows(p.m, p.k);
  for (int64_t c0 = 0; c0 < p.m; c0 += mc) {
    const int64_t c1 = std::min(p.m, c0 + mc);
    int64_t j = n0;
    for (; j + 4 <= n1; j += 4) {
      const int8_t* w[4];
      Rows4I8(p, j, buf.data(), w);
      for (int c = 0; c < 4; ++c)
        for (int64_t ti = 0; ti < p.t; ++ti) {
          __m512i s = _mm512_setzero_si512();
          for (int64_t kk = ti * tk; kk < (ti + 1) * tk; kk += 64)
            s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(w[c] + kk));
          wsum[c * p.t + ti] = _mm512_reduce_add_epi32(s);
        }
      RowBlocks<kRows>(kU8Blocks, c0, c1, p, w, wsum.data(), j);
    }
  }
  if ((n1 - n0) % 4) RangeScalar(p, n1 - (n1 - n0) % 4, n1);
}
#undef QLITE_TGT
}  // namespace vnni

// AVX2 dot form (cpu_kernels_avx2.inc): vpmaddwd + vpaddd; with AVX-VNNI
// the 256-bit vpdpwssd (VEX encoded) fuses the two.
namespace avx2 {
#define QLITE_TGT __attribute__((target("avx2")))
#define QLITE_MADD(acc, x, w) \
  _mm256_add_epi32(acc, _mm256_madd_epi16(x, w))
#define QLITE_AVX2_U8 0
#include "cpu_kernels_avx2.inc"
#undef QLITE_AVX2_U8
#undef QLITE_TGT
#undef QLITE_MADD
}  // namespace avx2

namespace avxvnni {
#define QLITE_TGT __attribute__((target("avx2,avxvnni")))
#define QLITE_MADD(acc, x, w) _mm256_dpwssd_avx_epi32(acc, x, w)
#define QLITE_AVX2_U8 1
#include "cpu_kernels_avx2.inc"
#undef QLITE_AVX2_U8
#undef QLITE_TGT
#undef QLITE_MADD
}  // namespace avxvnni

bool HasAvx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
bool HasAvxVnni() {
  static const bool ok = HasAvx2() && __builtin_cpu_supports("avxvnni");
  return ok;
}
bool HasAvx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw");
  return ok;
}
bool HasVnni() {
  static const bool ok = HasAvx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
}
#endif  // QLITE_X86

// Instruction-set families (the `isa` attribute; qlite/kernels/cpu.py
// FAMILIES has the same order).
enum Family : int {
  kFamScalar = 0, kFamAvx2 = 1, kFamAvxVnni = 2, kFamAvx512Bw = 3,
  kFamVnni = 4, kFamNeon = 5, kNumFamilies = 6
};

bool FamilySupported(int f) {
  switch (f) {
    case kFamScalar: return true;
#ifdef QLITE_X86
    case kFamAvx2: return HasAvx2();
    case kFamAvxVnni: return HasAvxVnni();
    case kFamAvx512Bw: return HasAvx512();
    case kFamVnni: return HasVnni();
#endif
#ifdef QLITE_ARM
    case kFamNeon: return true;
#endif
    default: return false;
  }
}

// The best family this CPU supports.
int CpuIsa() {
  for (int f : {kFamVnni, kFamAvx512Bw, kFamAvxVnni, kFamAvx2, kFamNeon})
    if (FamilySupported(f)) return f;
  return kFamScalar;
}

// Paths (the order of qlite/kernels/cpu.py ISA_NAMES): 0 scalar, 1
// AVX-512BW int16 dot form, 2 AVX-512 VNNI int16 dot form (vpdpwssd), 3
// VNNI u8 x s8 dot form (vpdpbusd, int8 activations), 4 VNNI GEMM form
// (packed weight panels; int8 or int16 activations, M >= GemmMinM), 5 AVX2
// int16 dot form (vpmaddwd), 6 AVX-VNNI int16 dot form (ymm vpdpwssd), 7
// NEON (vmlal / vmull + vpadal), 8 NEON sdot, 9 NEON smmla (i8mm), 10
// AVX-VNNI u8 x s8 dot form (ymm vpdpbusd, int8 activations, int8 weights).
constexpr int kNumPaths = 11;

// QLITE_CPU_KERNELS_ISA=vnni16|dot caps the VNNI family's sub-paths (for
// measuring and testing them; "dot" = no GEMM form). Read once.
const int kVnniCap = [] {
  const char* e = std::getenv("QLITE_CPU_KERNELS_ISA");
  if (e != nullptr && std::strcmp(e, "vnni16") == 0) return 2;
  if (e != nullptr && std::strcmp(e, "dot") == 0) return 3;
  return 4;
}();

// The path for problem p in family `fam` (which the CPU supports).
int PathFor(const Problem& p, bool int8_act, int fam) {
  if (fam == kFamScalar || !SimdShapeOk(p)) return 0;
  switch (fam) {
    case kFamAvx2: return 5;
    case kFamAvxVnni:
      // u8 x s8 (int8 activations, int8 weights) from 2 rows: the weight
      // row sums cost one more pass over each block
      return int8_act && !p.int4 && p.m >= 2 ? 10 : 6;
    case kFamAvx512Bw: return 1;
    case kFamVnni: {
      if (p.m >= GemmMinM(int8_act) && kVnniCap == 4) return 4;
      // u8 x s8 needs the weight row sums (one more pass over each weight
      // block): below 4 rows the int16 form is faster (2048 x 2048, M=1:
      // 0.16 vs 0.19 ms; M=8: 0.44 vs 0.29 ms).
      const bool u8 = int8_act && (p.k / p.t) % 64 == 0 && p.m >= 4;
      return std::min(kVnniCap, u8 ? 3 : 2);
    }
#ifdef QLITE_ARM
    case kFamNeon: return int8_act ? 7 + NeonBestVariant() : 7;
#endif
    default: return 0;
  }
}

// Calls per path since the module was loaded (indexed by PathFor()'s
// value), read by isa_counts() so that tests can check which path ran.
std::atomic<int64_t> g_path_calls[kNumPaths];

void Range(const Problem& p, int path, int64_t n0, int64_t n1) {
  switch (path) {
#ifdef QLITE_X86
    case 4: return vnni::RangeGemm(p, n0, n1);
    case 3: return vnni::RangeU8(p, n0, n1);
    case 2: return vnni::RangeAvx512(p, n0, n1);
    case 1: return bw::RangeAvx512(p, n0, n1);
    case 5: return avx2::RangeAvx2(p, n0, n1);
    case 6: return avxvnni::RangeAvx2(p, n0, n1);
    case 10: return avxvnni::RangeU8(p, n0, n1);
#endif
#ifdef QLITE_ARM
    case 7: case 8: case 9: return RangeNeon(p, path - 7, n0, n1);
#endif
    default: return RangeScalar(p, n0, n1);
  }
}

// Chunks of one call and the claim counter the caller and the pool tasks
// share. Held by shared_ptr: a pool task that starts after the caller has
// finished every chunk finds none left and touches nothing else.
struct Work {
  std::vector<Problem> parts;
  std::vector<std::pair<int64_t, int64_t>> cols;
  int path = 0;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;

  // Claims and runs chunks until none is left; true if it ran any.
  void Drain() {
    const int64_t n = static_cast<int64_t>(parts.size());
    for (int64_t c; (c = next.fetch_add(1)) < n;) {
      Range(parts[c], path, cols[c].first, cols[c].second);
      std::lock_guard<std::mutex> l(mu);
      if (++done == n) cv.notify_all();
    }
  }
};

// Runs Range over [0, N) split in chunks over the pool and waits for all of
// them. Chunks split N (multiples of 4, or of a 64-column panel in the GEMM
// form); a GEMM with fewer panels than threads splits its rows instead.
// Chunks are claimed, not assigned: the caller runs chunks until none is
// left, so a pool thread that is slow to start (a loaded machine) delays
// the call by at most the chunk it claimed, never by a chunk waiting for
// it. Up to 4 chunks per thread, each at least ~1 MiB of weight bytes x
// activation rows / 4.
void Run(const Problem& p, int path, ffi::ThreadPool& pool) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t align = path == 4 ? 64 : 4;
  const int64_t row_bytes = p.int4 ? p.k / 2 : p.k;
  const int64_t by_size = std::max<int64_t>(
      1, (p.n * row_bytes * std::max<int64_t>(1, p.m / 4)) >> 20);
  int64_t chunks = std::min<int64_t>(threads == 1 ? 1 : 4 * threads,
                                     by_size);
  const bool split_m = path == 4 && (p.n + align - 1) / align < chunks &&
                       p.m >= 32;
  if (!split_m)
    chunks = std::max<int64_t>(
        1, std::min<int64_t>(chunks, (p.n + align - 1) / align));
  if (chunks <= 1) {
    Range(p, path, 0, p.n);
    return;
  }
  // chunk c as its own problem: a column range, or a row range (sub-problem
  // with the activations / sums / outputs offset)
  auto work = std::make_shared<Work>();
  work->path = path;
  if (split_m) {
    const int64_t per = (p.m + chunks - 1) / chunks;
    for (int64_t m0 = 0; m0 < p.m; m0 += per) {
      Problem q = p;
      q.m = std::min(per, p.m - m0);
      if (q.a) q.a += m0 * p.k;
      if (q.a8) q.a8 += m0 * p.k;
      if (q.asum) q.asum += m0 * p.t;
      q.out += m0 * p.t * p.n;
      work->parts.push_back(q);
      work->cols.emplace_back(0, p.n);
    }
  } else {
    const int64_t per = ((p.n + chunks - 1) / chunks + align - 1) / align * align;
    for (int64_t n0 = 0; n0 < p.n; n0 += per) {
      work->parts.push_back(p);
      work->cols.emplace_back(n0, std::min(p.n, n0 + per));
    }
  }
  const int64_t n = static_cast<int64_t>(work->parts.size());
  const int64_t helpers = std::min<int64_t>(threads, n) - 1;
  for (int64_t i = 0; i < helpers; ++i)
    pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> l(work->mu);
  work->cv.wait(l, [&] { return work->done == n; });
}

ffi::Error DotImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer w,
                   ffi::Result<ffi::AnyBuffer> out, int64_t tiles,
                   int64_t isa, bool int4) {
  auto ad = a.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (ad.size() != 2 || wd.size() != 2 || od.size() != 3)
    return ffi::Error::InvalidArgument("qlite dot: expected a[M,K], w[N,K]");
  Problem p{};
  p.m = ad[0];
  p.k = ad[1];
  p.n = wd[0];
  p.t = tiles;
  p.int4 = int4;
  const int64_t wk = int4 ? p.k / 2 : p.k;
  if (tiles < 1 || p.k % tiles || wd[1] != wk || (int4 && p.k % 64) ||
      od[0] != p.m || od[1] != tiles || od[2] != p.n)
    return ffi::Error::InvalidArgument("qlite dot: shape mismatch");
  const bool int8_act = a.element_type() == ffi::DataType::S8;
  if (!int8_act && a.element_type() != ffi::DataType::S16)
    return ffi::Error::InvalidArgument("qlite dot: activations must be s8 or s16");
  const int fam = isa < 0 ? CpuIsa() : static_cast<int>(isa);
  if (fam >= kNumFamilies || !FamilySupported(fam))
    return ffi::Error::InvalidArgument(
        "qlite dot: instruction-set family not supported by this CPU");
  const int path = PathFor(p, int8_act, fam);
  g_path_calls[path].fetch_add(1, std::memory_order_relaxed);
  std::vector<int16_t> a16;
  std::vector<uint8_t> au8;
  std::vector<int32_t> asum;
  const int8_t* a8 = reinterpret_cast<const int8_t*>(a.untyped_data());
  if (!int8_act) {
    p.a = reinterpret_cast<const int16_t*>(a.untyped_data());
  } else if (path == 4) {
    // GEMM form: the int8 rows as they are, plus their sums per K tile
    p.a8 = a8;
    asum.resize(p.m * p.t);
    const int64_t tk = p.k / p.t;
    for (int64_t i = 0; i < p.m * p.t; ++i) {
      int32_t sum = 0;
      for (int64_t kk = 0; kk < tk; ++kk) sum += p.a8[i * tk + kk];
      asum[i] = sum;
    }
    p.asum = asum.data();
  } else if (path == 0 || (path >= 7 && path <= 9)) {
    p.a8 = a8;                        // scalar and NEON read int8 rows
  } else {
    a16.assign(a8, a8 + p.m * p.k);   // int16 dot forms and their tails
    p.a = a16.data();
    if (path == 3 || path == 10) {
      au8.resize(p.m * p.k);
      for (int64_t i = 0; i < p.m * p.k; ++i)
        au8[i] = static_cast<uint8_t>(a8[i]) ^ 0x80;
      p.au8 = au8.data();
    }
  }
  p.w = reinterpret_cast<const uint8_t*>(w.untyped_data());
  p.out = reinterpret_cast<int32_t*>(out->untyped_data());
  Run(p, path, pool);
  return ffi::Error::Success();
}

ffi::Error I8Dot(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer w,
                 ffi::Result<ffi::AnyBuffer> out, int64_t tiles, int64_t isa) {
  return DotImpl(pool, a, w, out, tiles, isa, false);
}
ffi::Error I4Dot(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer w,
                 ffi::Result<ffi::AnyBuffer> out, int64_t tiles, int64_t isa) {
  return DotImpl(pool, a, w, out, tiles, isa, true);
}

// Packs the weight's VNNI u8 panels once (AVX-512 VNNI only): w int8
// [N, K] (int4 = 0) or packed int4 [N, K/2] (int4 = 1) -> u8 [ceil(N/64),
// 64 K].
ffi::Error PackPanels(ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out,
                      int64_t int4) {
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (wd.size() != 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("qlite pack: expected w[N,K]");
  Problem p{};
  p.n = wd[0];
  p.k = int4 ? 2 * wd[1] : wd[1];
  p.t = 1;
  p.m = 0;
  p.int4 = int4 != 0;
  if (p.k % (p.int4 ? 64 : 32) || od[0] != (p.n + 63) / 64 ||
      od[1] != 64 * p.k)
    return ffi::Error::InvalidArgument("qlite pack: shape mismatch");
#ifdef QLITE_X86
  if (!HasVnni())
#endif
    return ffi::Error::InvalidArgument(
        "qlite pack: VNNI panels need AVX-512 VNNI");
#ifdef QLITE_X86
  p.w = reinterpret_cast<const uint8_t*>(w.untyped_data());
  vnni::PackAllU8Panels(p, reinterpret_cast<uint8_t*>(out->untyped_data()));
  return ffi::Error::Success();
#endif
}

// The VNNI GEMM form on panels packed once: a int8 [M, K] x panels (from
// PackPanels for an [N, K] weight) -> int32 [M, T, N].
ffi::Error GemmPanels(ffi::ThreadPool pool, ffi::AnyBuffer a,
                      ffi::AnyBuffer panels, ffi::Result<ffi::AnyBuffer> out,
                      int64_t tiles) {
  auto ad = a.dimensions();
  auto pd = panels.dimensions();
  auto od = out->dimensions();
  if (ad.size() != 2 || pd.size() != 2 || od.size() != 3)
    return ffi::Error::InvalidArgument("qlite gemm: expected a[M,K], panels");
  if (a.element_type() != ffi::DataType::S8)
    return ffi::Error::InvalidArgument("qlite gemm: activations must be s8");
  Problem p{};
  p.m = ad[0];
  p.k = ad[1];
  p.n = od[2];
  p.t = tiles;
  if (tiles < 1 || p.k % tiles || (p.k / tiles) % 32 || od[0] != p.m ||
      od[1] != tiles || pd[0] != (p.n + 63) / 64 || pd[1] != 64 * p.k)
    return ffi::Error::InvalidArgument("qlite gemm: shape mismatch");
#ifdef QLITE_X86
  if (!HasVnni())
#endif
    return ffi::Error::InvalidArgument(
        "qlite gemm: VNNI panels need AVX-512 VNNI");
#ifdef QLITE_X86
  g_path_calls[4].fetch_add(1, std::memory_order_relaxed);
  p.a8 = reinterpret_cast<const int8_t*>(a.untyped_data());
  std::vector<int32_t> asum(p.m * p.t);
  const int64_t tk = p.k / p.t;
  for (int64_t i = 0; i < p.m * p.t; ++i) {
    int32_t sum = 0;
    for (int64_t kk = 0; kk < tk; ++kk) sum += p.a8[i * tk + kk];
    asum[i] = sum;
  }
  p.asum = asum.data();
  p.panels = reinterpret_cast<const uint8_t*>(panels.untyped_data());
  p.out = reinterpret_cast<int32_t*>(out->untyped_data());
  Run(p, 4, pool);
  return ffi::Error::Success();
#endif
}

}  // namespace
}  // namespace qlite_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(QliteI8DotNK, qlite_kernels::I8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tiles")
                                  .Attr<int64_t>("isa"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QliteI4DotNK, qlite_kernels::I4Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tiles")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QlitePackU8Panels, qlite_kernels::PackPanels,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("int4"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QliteI8GemmPanels, qlite_kernels::GemmPanels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tiles"));

// ------------------------------------------------------- Python module --
// Adds {name: capsule} to d; false (with the Python error set) on failure.
static bool AddCapsule(PyObject* d, const char* name, void* fn) {
  PyObject* c = PyCapsule_New(fn, nullptr, nullptr);
  if (c == nullptr) return false;
  const int rc = PyDict_SetItemString(d, name, c);
  Py_DECREF(c);   // the dict holds its own reference (or none on failure)
  return rc == 0;
}

static PyObject* Targets(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  if (!AddCapsule(d, "qlite_i8_dot_nk", reinterpret_cast<void*>(&QliteI8DotNK)) ||
      !AddCapsule(d, "qlite_i4_dot_nk", reinterpret_cast<void*>(&QliteI4DotNK)) ||
      !AddCapsule(d, "qlite_pack_u8_panels",
                  reinterpret_cast<void*>(&QlitePackU8Panels)) ||
      !AddCapsule(d, "qlite_i8_gemm_panels",
                  reinterpret_cast<void*>(&QliteI8GemmPanels))) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

static PyObject* IsaCounts(PyObject*, PyObject*) {
  PyObject* t = PyTuple_New(qlite_kernels::kNumPaths);
  if (t == nullptr) return nullptr;
  for (int i = 0; i < qlite_kernels::kNumPaths; ++i) {
    PyObject* v = PyLong_FromLongLong(
        qlite_kernels::g_path_calls[i].load(std::memory_order_relaxed));
    if (v == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, i, v);
  }
  return t;
}

static PyObject* CpuIsaPy(PyObject*, PyObject*) {
  return PyLong_FromLong(qlite_kernels::CpuIsa());
}

// (family code, supported) for every family, and the NEON extensions.
static PyObject* CpuFeatures(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  static const char* kNames[] = {"scalar", "avx2", "avxvnni", "avx512bw",
                                 "vnni", "neon"};
  bool ok = true;
  for (int f = 0; f < qlite_kernels::kNumFamilies && ok; ++f)
    ok = PyDict_SetItemString(
             d, kNames[f],
             qlite_kernels::FamilySupported(f) ? Py_True : Py_False) == 0;
#ifdef QLITE_ARM
  if (ok)
    ok = PyDict_SetItemString(d, "neon_dotprod",
                              qlite_kernels::NeonHasDotprod() ? Py_True
                                                              : Py_False) == 0;
  if (ok)
    ok = PyDict_SetItemString(d, "neon_i8mm",
                              qlite_kernels::NeonHasI8mm() ? Py_True
                                                           : Py_False) == 0;
#endif
  if (!ok) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

static PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS,
     "Returns {ffi target name: PyCapsule of the XLA FFI handler}."},
    {"isa_counts", IsaCounts, METH_NOARGS,
     "Returns calls per path (see qlite.kernels.cpu.ISA_NAMES) since the "
     "module was loaded."},
    {"cpu_isa", CpuIsaPy, METH_NOARGS,
     "Returns the best instruction-set family this CPU supports (0 scalar, "
     "1 avx2, 2 avxvnni, 3 avx512bw, 4 vnni, 5 neon)."},
    {"cpu_features", CpuFeatures, METH_NOARGS,
     "Returns {family or extension: supported by this CPU}."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                              "qlite CPU kernels (XLA FFI handlers)", -1,
                              kMethods, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&kModule); }
