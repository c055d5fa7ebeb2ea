// NEON paths of the qlite CPU kernels (aarch64, GCC or Clang), shared by
// qlite/kernels/cpu_kernels.cc and the standalone bit-exactness harness
// tests/neon/neon_harness.cc (cross-compiled and run under qemu-aarch64).
// Include after cpu_kernels_core.h and a definition of RowBlocks.

#ifndef QLITE_KERNELS_CPU_KERNELS_NEON_H_
#define QLITE_KERNELS_CPU_KERNELS_NEON_H_

#include <arm_neon.h>

#if defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace qlite_kernels {

namespace neon_base {
#define QLITE_NTGT
#define QLITE_NMAC(acc, x, w)                                             \
  vpadalq_s16(vpadalq_s16(acc, vmull_s8(vget_low_s8(x), vget_low_s8(w))), \
              vmull_high_s8(x, w))
#define QLITE_I8MM 0
#include "cpu_kernels_neon.inc"
#undef QLITE_NTGT
#undef QLITE_NMAC
#undef QLITE_I8MM
}  // namespace neon_base

namespace neon_dot {
#define QLITE_NTGT __attribute__((target("arch=armv8.2-a+dotprod")))
#define QLITE_NMAC(acc, x, w) vdotq_s32(acc, x, w)
#define QLITE_I8MM 0
#include "cpu_kernels_neon.inc"
#undef QLITE_NTGT
#undef QLITE_NMAC
#undef QLITE_I8MM
}  // namespace neon_dot

namespace neon_i8mm {
#define QLITE_NTGT __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#define QLITE_NMAC(acc, x, w) vdotq_s32(acc, x, w)
#define QLITE_I8MM 1
#include "cpu_kernels_neon.inc"
#undef QLITE_NTGT
#undef QLITE_NMAC
#undef QLITE_I8MM
}  // namespace neon_i8mm

// What this CPU supports, read once from the OS (Linux: HWCAP bits; macOS:
// sysctl hw.optional.arm.FEAT_*); false where unknown.
inline bool NeonHasDotprod() {
  static const bool ok = [] {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & (1UL << 20)) != 0;   // HWCAP_ASIMDDP
#elif defined(__APPLE__)
    int v = 0;
    size_t n = sizeof(v);
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, nullptr,
                        0) == 0 && v != 0;
#else
    return false;
#endif
  }();
  return ok;
}

inline bool NeonHasI8mm() {
  static const bool ok = [] {
#if defined(__linux__)
    return NeonHasDotprod() &&
           (getauxval(AT_HWCAP2) & (1UL << 13)) != 0;   // HWCAP2_I8MM
#elif defined(__APPLE__)
    int v = 0;
    size_t n = sizeof(v);
    return NeonHasDotprod() &&
           sysctlbyname("hw.optional.arm.FEAT_I8MM", &v, &n, nullptr, 0) ==
               0 && v != 0;
#else
    return false;
#endif
  }();
  return ok;
}

// NEON variants: 0 plain (vmull + vpadal), 1 dotprod (sdot), 2 i8mm (smmla
// on row pairs, sdot for an odd last row). int16 activations take the same
// vmlal_s16 loop in all three.
inline void RangeNeon(const Problem& p, int variant, int64_t n0,
                      int64_t n1) {
  if (variant == 2) return neon_i8mm::RangeNeon(p, n0, n1);
  if (variant == 1) return neon_dot::RangeNeon(p, n0, n1);
  neon_base::RangeNeon(p, n0, n1);
}

// The best variant this CPU supports.
inline int NeonBestVariant() {
  return NeonHasI8mm() ? 2 : NeonHasDotprod() ? 1 : 0;
}

}  // namespace qlite_kernels

#endif  // QLITE_KERNELS_CPU_KERNELS_NEON_H_
