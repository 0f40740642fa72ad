// GEMM operand/epilogue descriptions shared by the fused inference kernels' two instruction sets:
// fused_avx2.cpp (AVX2+FMA, 8-wide) and fused_avx512.cpp (AVX-512F/DQ/BW/VL, 16-wide). Internal to
// csrc/cpu/ (plain structs and function declarations only: the two files are compiled for different
// targets, so nothing inline or templated may be shared between them - the linker could keep one
// target's copy for both).
#pragma once

#include <cstdint>

namespace slvit_fused {

enum Act { kNone = 0, kGelu = 1, kRelu = 2 };

// GEMM: C[r][c] = act(alpha * col_scale[c] * sum_k A[r][k] B[k][c] + row_bias[r] + add[r][c]).
// A[r][k] sits at A + r*a_rs + k*a_ks (weights: a_rs = in_features, a_ks = 1; attention operands
// are read transposed through the strides), B rows are contiguous token columns (ldb apart).
struct Epi {
  const float* col_scale = nullptr;  // per output column (softmax 1/sum folded into P V)
  const float* row_bias = nullptr;
  const float* add = nullptr;
  int64_t ld_add = 0;
  float alpha = 1.f;
  int act = kNone;
};

// The K loop may be cut into `nseg` segments of K each (A and B jump by a_seg / b_seg floats
// between them): the patch matrix is stored in 16 (i, j) segments so that its gather never writes
// rows a multiple of 4 KiB apart.
//
// k_block: a long K loop (nseg * K > the block) is summed in blocks of that many k steps (counted
// across segments), each block's register partials added into a small per-tile buffer, so a float32
// sum of 32768 products is ~sqrt(512) + sqrt(64) rounding steps deep instead of ~sqrt(32768) (the
// audiocsrnet-av1 patch embedding, K = 8*8*512, missed the reference tolerance by 2.8x when summed
// in order). 0 = kKBlock; < 0 = one block (the old in-order sum; for measuring and tests only).
// The epilogue applies once, after the last block; K <= the block runs the unblocked loop unchanged.
//
// b_masked_tail (AVX2 tiles; the AVX-512 tiles always mask): the last partial column block loads B
// (and col_scale) with the tail mask, so no column >= ncols is read. Off: B is read up to the next
// 16-column boundary (buffers carry column padding), as always. Set it when B's rows are not padded
// and the floats past column ncols may belong to another worker (e.g. V as a strided view of a
// shared qkv buffer).
struct Shape {
  int64_t K, a_rs, a_ks, ldb, ldc;
  int64_t nseg = 1, a_seg = 0, b_seg = 0;
  int64_t k_block = 0;
  bool b_masked_tail = false;
};

// Default k steps per block (see Shape::k_block): 512 keeps the flush (one add per accumulator)
// below 0.5% of the block's FMAs.
constexpr int64_t kKBlock = 512;

// Rows the AVX-512 GEMM wants per worker share (team row splits are multiples of it).
constexpr int kRowStep512 = 8;

// AVX-512 GEMM (fused_avx512.cpp), same contract as gemm_sh in fused_avx2.cpp: rows [r0, r1) of C,
// columns [0, ncols), column blocks of 16 outer; B row-major (b_blk = 0) or in 16-column panels b_blk
// floats apart (ldb = 16). Only B/add/col_scale columns < ncols are read (masked tails), so unlike
// the AVX2 tiles it needs no column padding. Call only when avx512_missing() returned nullptr.
void gemm_sh_avx512(int64_t r0, int64_t r1, int64_t ncols, const Shape& sh, const float* A, const float* Bm, float* C,
                    const Epi& e, int64_t b_blk);

// The inference forward's GEMM on either ISA's tiles (fused_avx2.cpp), for other kernels of this
// directory (the training path): kIsaAvx2 = the AVX2 6 x 16 tiles, whose B reads run up to the next
// 16-column boundary (buffers need column padding) unless sh.b_masked_tail is set; kIsaAvx512 = gemm_sh_avx512 above (masked tails;
// only when avx512_missing() returned nullptr). Serial, on the calling thread.
void gemm_tiles(int isa, int64_t r0, int64_t r1, int64_t ncols, const Shape& sh, const float* A, const float* Bm,
                float* C, const Epi& e, int64_t b_blk = 0);

// The 4-pixel-row patch gather of fused_avx2.cpp's gather_panel (pw == 4, unit pixel stride) for
// channels [c0, c1): per (channel, patch row i) the 16 tokens' 4 pixels (src[t] + c*sc[t] + i*sh[t])
// become 4 rows of 16 (pixel j at panel + (i*4 + j)*seg + c*16), with the same read-ahead of channel
// plane c + 4 (rows[0..nrows) + c*plane, row_bytes each).
void gather_px4_avx512(const float* const src[16], const int64_t sc[16], const int64_t sh[16], int64_t ph, int64_t seg,
                       float* panel, int64_t c0, int64_t c1, const float* const rows[], int nrows, int64_t row_bytes,
                       int64_t plane);

// Patch embedding straight from NCHW image rows (patch_embed_avx512.cpp), for unit pixel stride and
// the patch widths / row lengths where embed_rows_wanted says it beats the gathered panels (pw 2, 4
// or 8 and rows of more than 16 pixels). For one sample and channels [0, nc)
// of x (x points at channel 0 of that range, pixel (0, 0); sc / sh: plane and row strides):
//   out[e*ldo + gy*gw + gx] = sum_{c, i, j} Wk[e*ldw + (c*ph + i)*pw + j] * x[c*sc + (gy*ph + i)*sh + gx*pw + j]
//                             (+ bias[e]) (+ add[e*ld_add + gy*gw + gx])   for e < d and every patch;
// Wk is the weight in (e, c, i, j) order (pack_patch_weight), offset to the range's first channel.
// Only the patch columns [0, gh*gw) of out are written; add / bias may be nullptr.
//
// pack (optional): Wk is not packed yet; the call packs channels [pack->c0, pack->c1) of pack->Wp itself,
// one row block at a time just before that block's tiles (row blocks outermost): into pack->block when
// given - one block's rows, a buffer that stays in cache (a team's batch-1 call: writing the whole packed
// weight cold on every call was most of the repack's cost) - else into pack->Wk_all (Wk == pack->Wk_all +
// c0*ph*pw, ldw == P), for later calls without pack. Same results as packing first: every output is summed
// in the same order.
struct PackSource {
  const float* Wp;  // d x P, PyTorch's order (pack_patch_weight)
  int64_t C, c0, c1;
  float* Wk_all;
  // non-null: room for one row block's packed rows (12 x (c1 - c0)*ph*pw floats, or d rows when d < 12),
  // packed into instead of Wk_all (which is then left unwritten: for a caller that embeds one sample)
  float* block = nullptr;
};
bool embed_rows_wanted(int64_t pw, int64_t row_pixels);
void embed_rows_avx512(const float* x, int64_t sc, int64_t sh, int64_t nc, int64_t ph, int64_t pw, int64_t gh,
                       int64_t gw, const float* Wk, int64_t ldw, int64_t d, float* out, int64_t ldo, const float* add,
                       int64_t ld_add, const float* bias, const PackSource* pack = nullptr);
// Channels [c0, c1) of the patch embedding's weight Wp (d x P, PyTorch's (e, (i, j, c)) order, P =
// ph*pw*C) into Wk (d x P) in (e, (c, i, j)) order: Wk[e*P + (c*ph + i)*pw + j] = Wp[e*P + (i*pw + j)*C + c].
void pack_patch_weight(const float* Wp, int64_t d, int64_t C, int64_t ph, int64_t pw, int64_t c0, int64_t c1,
                       float* Wk);

// fused_avx2.cpp's softmax_cols on 16-column blocks: softmax down each of the first ncol columns of a
// T x ldS score tile, left unnormalised (St = exp(St - colmax), inv_sum[col] = 1 / sum); the same exp.
void softmax_cols_avx512(float* St, int64_t T, int64_t ncol, int64_t ldS, float* inv_sum);

// fused_avx2.cpp's gelu_forward_grad on 16-lane vectors: the same ops term for term (erf with a true
// divide, not erf512's reciprocal), so the results are the AVX2 variant's bits.
void gelu_forward_grad_avx512(const float* x, float* y, float* dydx, int64_t n);

}  // namespace slvit_fused
