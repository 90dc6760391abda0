// The row-invariant linear layer's kernel, one per instruction set: csrc/linear_tile.h compiled for
// each (linear_avx512.cpp, linear_avx2.cpp, and the portable one in linear.cpp). linear.cpp packs the
// weight and spreads the panels over threads; a kernel computes a range of panels for every row.
#pragma once

#include <cstdint>

#include "kernels.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PF_X86_LINEAR 1  // linear_avx2.cpp and linear_avx512.cpp define their kernels
#endif

// PF_TARGET_BEGIN("avx2,fma") ... PF_TARGET_END: every function defined in between (template
// instantiations included) is compiled for that target, whatever the file's flags.
#define PF_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define PF_TARGET_BEGIN(isa) PF_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define PF_TARGET_END PF_PRAGMA(clang attribute pop)
#else
#define PF_TARGET_BEGIN(isa) PF_PRAGMA(GCC push_options) PF_PRAGMA(GCC target(isa))
#define PF_TARGET_END PF_PRAGMA(GCC pop_options)
#endif

namespace pfengine {

struct LinearKernel {
  int64_t panel;  // output columns per packed panel
  void (*panels)(const LinearArgs& a, int64_t p0, int64_t p1);  // panels [p0, p1), all rows
};

// Call these only where cpu_supports() says the CPU runs their instruction set.
extern const LinearKernel kLinearPortable;
#ifdef PF_X86_LINEAR
extern const LinearKernel kLinearAvx2;
extern const LinearKernel kLinearAvx512;
#endif

}  // namespace pfengine
