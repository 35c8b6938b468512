/* What the kernels of lean.c, chain.c and batch_norm.c share: the error convention, checked allocation, the SIMD
   vector types, the ReLU-mask format, and the lean forward with its problem and epilogue structures.

   Error convention: every exported kernel returns KERNEL_OK (0) after writing its outputs, or, writing nothing,
   KERNEL_INVALID (arguments outside its range) or KERNEL_NO_MEMORY (an allocation failed). Every allocation goes
   through kernel_malloc / kernel_calloc, which fail on request (kernel_fail_allocation) so that the caller's
   handling of KERNEL_NO_MEMORY can be tested; a parallel region allocates nothing (its threads' scratch memory is
   allocated before it).

   Vectors: VW floats (16 with AVX-512, else 8), GCC's vector extension; vload/vstore are unaligned.

   ReLU-mask format: one int8 per element of the masked tensor, in its layout (channels-last), -1 where the
   element is kept (the forward's ReLU input was > 0) and 0 where it is not. widen_mask turns VW such bytes into
   lane masks (all bits set or clear), narrow_mask the lanes of a comparison back into bytes. */
#ifndef PDENET_KERNELS_H
#define PDENET_KERNELS_H

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { KERNEL_OK = 0, KERNEL_INVALID = 1, KERNEL_NO_MEMORY = 2 };

void *kernel_malloc(size_t bytes);
void *kernel_calloc(size_t count, size_t size);

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vec __attribute__((vector_size(VW * 4)));
typedef float vecu __attribute__((vector_size(VW * 4), aligned(4), may_alias)); /* unaligned access */
typedef int32_t lanes __attribute__((vector_size(VW * 4)));
typedef int8_t mask_bytes __attribute__((vector_size(VW)));
typedef int8_t lane_bytes __attribute__((vector_size(VW * 4)));

static inline vec vload(const float *p) { return *(const vecu *)p; }
static inline void vstore(float *p, vec v) { *(vecu *)p = v; }
static inline vec vsplat(float a) { return a - (vec){0}; }

/* the VW mask bytes at m sign-extended to lanes: one instruction with AVX2 or AVX-512 (GCC assembles a
   __builtin_convertvector of bytes lane by lane) */
static inline lanes widen_mask(const int8_t *m) {
#if defined(__AVX512F__)
  return (lanes)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)m));
#elif defined(__AVX2__)
  return (lanes)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)m));
#else
  mask_bytes b;
  memcpy(&b, m, VW);
  return __builtin_convertvector(b, lanes);
#endif
}

/* the lanes' low bytes (each lane is 0 or -1, so any byte is the lane's value): a byte shuffle, where GCC
   narrows a __builtin_convertvector one lane at a time */
#if VW == 16
#define LOW_BYTES 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60
#else
#define LOW_BYTES 0, 4, 8, 12, 16, 20, 24, 28
#endif
static inline mask_bytes narrow_mask(lanes m) {
  const lane_bytes all = (lane_bytes)m;
  return __builtin_shufflevector(all, all, LOW_BYTES);
}

/* v where the lane mask is set, else 0 */
static inline vec keep_where(lanes keep, vec v) { return (vec)(keep & (lanes)v); }

/* ------------------------------------------------------------ the lean forward, shared with chain.c */
/* The problem as the caller states it (pdenet_kernels/binding.py mirrors this structure): x (batch, height, width,
   in_channels) channels-last; P (out_channels, in_channels / groups); the stencil (stencil_channels, ntaps) on
   the flat indices taps of the kernel_size x kernel_size square; zero (circular = 0) or periodic boundary; the
   work split over `threads` OpenMP threads. */
typedef struct {
  int64_t batch, height, width, in_channels, out_channels, stencil_channels, kernel_size, groups, circular, threads,
      ntaps;
  const int64_t *taps;
} lean_shape;

/* Another tensor's channels, added to y as a register block stores it: y_j += add_j (pixel q's at add + q pitch,
   pitch >= co; add NULL for none), only where mask_j is set unless mask is NULL (bytes -1 or 0, the layout of
   add). */
typedef struct {
  const float *add;
  int64_t pitch;
  const int8_t *mask;
} addend;

/* What a register block does to its sums as it stores them: y_j = act(sum_j + add_j [mask_j] + bias_j), act the
   ReLU (relu != 0) or the identity; add NULL for no addend, bias NULL for none. The backward uses the addend
   alone (a shortcut's gradient), the inference forward all three (a folded batch norm's bias, the residual, the
   block's ReLU). */
typedef struct {
  addend add;
  const float *bias;
  int64_t relu;
} epilogue;

/* y = act(P x + S x + add [mask] + bias) (lean.c): ep NULL for y = P x + S x; shift/out NULL for no moments. */
int lean_forward(const lean_shape *shape, const float *x, const float *p, const float *s, const epilogue *ep,
                 float *y, const float *shift, double *out);

#endif
