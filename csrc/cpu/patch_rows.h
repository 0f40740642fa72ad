// Vector patch gather / scatter of the training path (slvit_cpu.cpp: patch_permute / patch_permute_cij),
// plain C++ API, no torch types. The patch matrix is token-major: row (b*Np + gy*gw + gx) of P floats,
// P = C*ph*pw, in one of the two column orders of slvit_cpu.cpp:
//   kChannelMajor (C, ph, pw): NCHW inputs; every piece is a run of pw pixels along an image row
//   kPixelMajor   (ph, pw, C): channels-inner inputs (channels_last); every piece is a run of C channels
// The scatter is the exact inverse (every x element belongs to exactly one patch slot: a permutation).
//
// Compiled for AVX2+FMA (patch_rows.cpp's pragma): call only after slvit_fused::cpu_supported() said yes.
// Layouts without a vector kernel (a non-unit stride along the run: W stride != 1 for kChannelMajor,
// C stride != 1 for kPixelMajor) are refused by rows_vectorized(); the caller keeps its scalar loop.
#pragma once

#include <cstdint>

namespace slvit_patch {

enum Order { kChannelMajor = 0, kPixelMajor = 1 };

struct Geom {
  int64_t C, H, W, ph, pw;  // feature map and patch size (H % ph == 0, W % pw == 0: checked by the caller)
  int64_t sb, sc, sh, sw;   // x strides in floats (any, 0 included)
};

// True when gather_rows / scatter_rows have a vector kernel for this order and these strides.
bool rows_vectorized(const Geom& g, Order o);

// Rows [bg_lo, bg_hi) of (sample, patch-grid row) pairs, bg = b * (H / ph) + gy, as in slvit_cpu.cpp's
// parallel split. pm points at the patch matrix's first row (sample 0), x at x[0, 0, 0, 0].
void gather_rows(const float* x, const Geom& g, Order o, float* pm, int64_t bg_lo, int64_t bg_hi);
void scatter_rows(const float* pm, const Geom& g, Order o, float* x, int64_t bg_lo, int64_t bg_hi);

}  // namespace slvit_patch
