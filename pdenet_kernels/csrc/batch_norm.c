/* Batch normalization in training mode followed by ReLU, with an optional residual added before the ReLU, for
   float32 channels-last tensors: x, r, y (P, C) with P = B H W pixels and the C channels contiguous.

   forward:  mean_c = sum_p x / P, var_c = sum_p (x - mean)^2 / P, invstd = 1 / sqrt(var + eps),
             a = gamma invstd, b = beta - mean a, y = max(0, a x + b [+ r]);
             running_mean += momentum (mean - running_mean), running_var likewise with var P / (P - 1).
   backward: gm = g [y > 0] (the mask from y, from the forward's mask bytes, or recomputed as a x + b > 0
             without a residual), dr = gm,
             dbeta = sum_p gm, dgamma = sum_p gm xhat = invstd sum_p gm (x - mean),
             dx = a (gm - dbeta / P - xhat dgamma / P) = a gm + e x + f.

   Two passes each way (a reduction, then an elementwise pass), split over OpenMP threads by blocks of pixels.
   The reductions sum in float over a block, in double across blocks, and across threads in thread order, so
   the result does not depend on the schedule; they sum x - k (k = the first pixel's x) and gm (x - mean), so
   that a mean large against the spread loses no precision. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

#define BLOCK 64 /* pixels per float partial sum */

/* out[c] = sum_p u(p, c), out[C + c] = sum_p v(p, c) over the P pixels, where `pass` adds one block's terms
   into the float sums (su, sv); per thread in double, then in thread order. */
typedef void (*block_sums)(const void *args, int64_t p0, int64_t p1, float *su, float *sv);

static int reduce(block_sums pass, const void *args, int64_t P, int64_t C, double *out, int nthreads) {
  /* per thread 3 C doubles: its 2 C sums in double, then room for a block's 2 C in float; allocated before the
     parallel region, which allocates nothing */
  double *partial = kernel_calloc((size_t)nthreads * 3 * (size_t)C, sizeof(double));
  if (!partial) return KERNEL_NO_MEMORY;
#pragma omp parallel num_threads(nthreads)
  {
    double *mine = partial + (size_t)omp_get_thread_num() * 3 * C;
    float *s = (float *)(mine + 2 * C);
#pragma omp for schedule(static)
    for (int64_t p0 = 0; p0 < P; p0 += BLOCK) {
      memset(s, 0, sizeof(float) * (size_t)(2 * C));
      pass(args, p0, p0 + BLOCK < P ? p0 + BLOCK : P, s, s + C);
      for (int64_t c = 0; c < 2 * C; ++c) mine[c] += s[c];
    }
  }
  memset(out, 0, sizeof(double) * (size_t)(2 * C));
  for (int t = 0; t < nthreads; ++t)
    for (int64_t c = 0; c < 2 * C; ++c) out[c] += partial[(size_t)t * 3 * C + c];
  free(partial);
  return KERNEL_OK;
}

typedef struct {
  const float *x, *g, *y, *a, *b, *shift;
  float *gr;
  const int8_t *mask; /* the forward's [y > 0] as bytes (-1 or 0), or NULL */
  int64_t C;
} tensors;

/* Each pass runs over chunks of W channels held in one vector register (GCC's vector extension): W = 16 with
   AVX-512, 8 otherwise, since GCC moves a vector wider than the registers through the stack (a 16-wide AVX2
   build ran 3x slower than PyTorch's batch norm). A chunk's sums and coefficients stay in registers over the
   pixels of a block, where a loop over a runtime channel count would add every pixel into memory, one
   dependent store-load chain per pixel. The reductions keep two sums, for even and odd pixels. The chunk
   functions are always inlined, so with width = W they are specialized; the last chunk, C mod W channels, is
   loaded into and stored from the low lanes of a zeroed vector. */
#define W VW
typedef lanes mask;
#define CHUNK static inline __attribute__((always_inline))
#define FOR_CHUNKS(call)                                                                                         \
  do {                                                                                                           \
    int64_t c0_ = 0;                                                                                             \
    for (; c0_ + W <= C; c0_ += W) call(c0_, W);                                                                 \
    if (c0_ < C) call(c0_, (int)(C - c0_));                                                                      \
  } while (0)

CHUNK vec load(const float *p, int width) {
  if (width == W) return *(const vecu *)p;
  vec v = {0};
  memcpy(&v, p, sizeof(float) * (size_t)width);
  return v;
}

CHUNK void store(float *p, vec v, int width) {
  if (width == W)
    *(vecu *)p = v;
  else
    memcpy(p, &v, sizeof(float) * (size_t)width);
}

/* width mask bytes (kernels.h) as a lane mask, and back */
CHUNK mask load_mask(const int8_t *p, int width) {
  if (width == W) return widen_mask(p);
  mask_bytes m = {0};
  memcpy(&m, p, (size_t)width);
  return __builtin_convertvector(m, mask);
}

CHUNK void store_mask(int8_t *p, mask m, int width) {
  const mask_bytes b = narrow_mask(m);
  memcpy(p, &b, (size_t)width);
}

/* a x + b, one expression for the forward and for the backward's recomputed mask, so that both round alike
   (GCC contracts it to one FMA in both where the processor has FMA) */
CHUNK vec affine(vec x, vec a, vec b) { return x * a + b; }

/* max(0, v), NaN and -0 kept (as the scalar v < 0 ? 0 : v) */
CHUNK vec relu(vec v) { return keep_where(~(v < 0), v); }

/* su += x - k, sv += (x - k)^2 with k = shift, for the channels [c0, c0 + width) */
CHUNK void moments_chunk(const tensors *t, int64_t p0, int64_t p1, int64_t c0, int width, float *su, float *sv) {
  const int64_t C = t->C;
  const float *x = t->x + c0;
  const vec k = load(t->shift + c0, width);
  vec u0 = {0}, v0 = {0}, u1 = {0}, v1 = {0};
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) {
    const vec d0 = load(x + p * C, width) - k, d1 = load(x + (p + 1) * C, width) - k;
    u0 += d0, v0 += d0 * d0, u1 += d1, v1 += d1 * d1;
  }
  if (p < p1) {
    const vec d = load(x + p * C, width) - k;
    u0 += d, v0 += d * d;
  }
  store(su + c0, load(su + c0, width) + u0 + u1, width);
  store(sv + c0, load(sv + c0, width) + v0 + v1, width);
}

static void moments(const void *args, int64_t p0, int64_t p1, float *su, float *sv) {
  const tensors *t = args;
  const int64_t C = t->C;
#define MOMENTS(c0, width) moments_chunk(t, p0, p1, c0, width, su, sv)
  FOR_CHUNKS(MOMENTS);
#undef MOMENTS
}

/* g [mask] at the element offset i: with a residual the mask y > 0 (residual = 1) or the forward's mask bytes
   (residual = 2), else a x + b > 0 recomputed */
CHUNK vec masked_at(const tensors *t, int64_t i, int width, vec a, vec b, int residual) {
  const vec g = load(t->g + i, width);
  return residual == 2 ? keep_where(load_mask(t->mask + i, width), g)
         : residual    ? keep_where(load(t->y + i, width) > 0, g)
                       : keep_where(affine(load(t->x + i, width), a, b) > 0, g);
}

/* gm = g [mask]; su += gm, sv += gm (x - mean) with mean = shift, for the channels [c0, c0 + width); with a
   residual and y (residual = 1) gm is also stored to gr (the residual's gradient). `residual` (0, 1 or 2, as in
   masked_at) is a constant where it is called. */
CHUNK void masked_chunk(const tensors *t, int64_t p0, int64_t p1, int64_t c0, int width, float *su, float *sv,
                        const int residual) {
  const int64_t C = t->C;
  const vec k = load(t->shift + c0, width), a = load(t->a + c0, width), b = load(t->b + c0, width);
  vec u0 = {0}, v0 = {0}, u1 = {0}, v1 = {0};
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) {
    const int64_t i0 = p * C + c0, i1 = i0 + C;
    const vec m0 = masked_at(t, i0, width, a, b, residual), m1 = masked_at(t, i1, width, a, b, residual);
    if (residual == 1) store(t->gr + i0, m0, width), store(t->gr + i1, m1, width);
    u0 += m0, v0 += m0 * (load(t->x + i0, width) - k);
    u1 += m1, v1 += m1 * (load(t->x + i1, width) - k);
  }
  if (p < p1) {
    const int64_t i = p * C + c0;
    const vec m = masked_at(t, i, width, a, b, residual);
    if (residual == 1) store(t->gr + i, m, width);
    u0 += m, v0 += m * (load(t->x + i, width) - k);
  }
  store(su + c0, load(su + c0, width) + u0 + u1, width);
  store(sv + c0, load(sv + c0, width) + v0 + v1, width);
}

static void masked_sums(const void *args, int64_t p0, int64_t p1, float *su, float *sv) {
  const tensors *t = args;
  const int64_t C = t->C;
#define MASKED_SUMS(c0, width)                                                                                   \
  (t->mask ? masked_chunk(t, p0, p1, c0, width, su, sv, 2)                                                       \
   : t->y  ? masked_chunk(t, p0, p1, c0, width, su, sv, 1)                                                       \
           : masked_chunk(t, p0, p1, c0, width, su, sv, 0))
  FOR_CHUNKS(MASKED_SUMS);
#undef MASKED_SUMS
}

/* y = max(0, a x + b [+ r]) over the pixels [p0, p1) and the channels [c0, c0 + width), and the bytes [y > 0]
   where mask_out is not NULL */
CHUNK void output_chunk(const float *x, const float *r, const float *coef_a, const float *coef_b, float *y,
                        int8_t *mask_out, int64_t C, int64_t p0, int64_t p1, int64_t c0, int width,
                        const int with_r) {
  const vec a = load(coef_a + c0, width), b = load(coef_b + c0, width);
  for (int64_t i = p0 * C + c0; i < p1 * C; i += C) {
    const vec z = affine(load(x + i, width), a, b), v = with_r ? z + load(r + i, width) : z;
    store(y + i, relu(v), width);
    if (mask_out) store_mask(mask_out + i, v > 0, width);
  }
}

/* dx = gm a + x e + f over the pixels [p0, p1) and the channels [c0, c0 + width), with gm read back from gr
   where the reduction stored it (with a residual: one tensor read instead of g and y), else as in masked_chunk */
CHUNK void input_grad_chunk(const tensors *t, const float *coef_e, const float *coef_f, float *dx, int64_t p0,
                            int64_t p1, int64_t c0, int width, const int residual) {
  const int64_t C = t->C;
  const vec a = load(t->a + c0, width), b = load(t->b + c0, width);
  const vec e = load(coef_e + c0, width), f = load(coef_f + c0, width);
  for (int64_t i = p0 * C + c0; i < p1 * C; i += C) {
    const vec gm = residual ? load(t->gr + i, width) : masked_at(t, i, width, a, b, 0);
    store(dx + i, gm * a + load(t->x + i, width) * e + f, width);
  }
}

/* The batch's a and b from its mean and invstd. */
static void scale_shift(const float *gamma, const float *beta, const float *mean, const float *invstd, int64_t C,
                        float *a, float *b) {
  for (int64_t c = 0; c < C; ++c) {
    a[c] = gamma[c] * invstd[c];
    b[c] = beta[c] - mean[c] * a[c];
  }
}

/* A batch-norm layer over P pixels of C channels (float32, channels-last), its work split over `threads` OpenMP
   threads: gamma, beta (C); running_mean, running_var (C), updated with `momentum` by the forward, or NULL;
   eps. */
typedef struct {
  int64_t pixels, channels, threads;
  const float *gamma, *beta;
  float *running_mean, *running_var;
  double momentum, eps;
} bn_layer;

/* y = max(0, a x + b [+ r]); save_mean and save_invstd (C) are kept for the backward. The batch's moments are
   summed here about the first pixel, or given (`given`, (2, C): sums of x - shift and (x - shift)^2, from the
   kernel that wrote x; shift may be running_mean itself, each channel's read before it is updated). Running
   statistics are updated when running_mean is not NULL. Unless mask_out is NULL it receives [y > 0] in the
   mask format of kernels.h, the mask of the backward without y. Returns an error code (kernels.h). */
int bn_relu_forward(const bn_layer *layer, const float *x, const float *r, const double *given, const float *shift,
                    float *y, int8_t *mask_out, float *save_mean, float *save_invstd) {
  const int64_t P = layer->pixels, C = layer->channels;
  const int nthreads = (int)layer->threads;
  float *running_mean = layer->running_mean, *running_var = layer->running_var;
  const double momentum = layer->momentum;
  if (P < 1 || C < 1 || nthreads < 1 || !given != !shift || !running_mean != !running_var) return KERNEL_INVALID;
  double *sums = given ? NULL : kernel_malloc(sizeof(double) * (size_t)(2 * C));
  float *a = kernel_malloc(sizeof(float) * (size_t)(2 * C)), *b = a ? a + C : NULL;
  const tensors t = {x, NULL, NULL, NULL, NULL, x, NULL, NULL, C}; /* shifted by the first pixel */
  const int status = !a || (!given && !sums) ? KERNEL_NO_MEMORY
                     : given                 ? KERNEL_OK
                                             : reduce(moments, &t, P, C, sums, nthreads);
  if (status != KERNEL_OK) {
    free(sums);
    free(a);
    return status;
  }
  const double *m = given ? given : sums;
  const float *k = given ? shift : x;
  for (int64_t c = 0; c < C; ++c) {
    const double shifted = m[c] / P, mean = k[c] + shifted, var = fmax(m[C + c] / P - shifted * shifted, 0.0);
    save_mean[c] = (float)mean;
    save_invstd[c] = (float)(1.0 / sqrt(var + layer->eps));
    if (running_mean) {
      running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean);
      running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * var * P / (P > 1 ? P - 1 : 1));
    }
  }
  scale_shift(layer->gamma, layer->beta, save_mean, save_invstd, C, a, b);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t p0 = 0; p0 < P; p0 += BLOCK) {
    const int64_t p1 = p0 + BLOCK < P ? p0 + BLOCK : P;
#define OUTPUT(c0, width)                                                                                        \
  (r ? output_chunk(x, r, a, b, y, mask_out, C, p0, p1, c0, width, 1)                                            \
     : output_chunk(x, r, a, b, y, mask_out, C, p0, p1, c0, width, 0))
    FOR_CHUNKS(OUTPUT);
#undef OUTPUT
  }
  free(sums);
  free(a);
  return KERNEL_OK;
}

/* The backward's reduction: dgamma, dbeta, gr = gm with a residual (then y is the forward's output, which gives
   the mask; y and gr come together or not at all) or, with mask (the forward's mask bytes, then y and gr are
   NULL), the mask alone, and the coefficients of dx = a gm + e x + f in coef (4 C: a, b, e, f; a and b those of
   the forward), from the output gradient g, the input x and the forward's saved mean and invstd. Returns an
   error code (kernels.h). */
int bn_relu_backward_coefficients(const bn_layer *layer, const float *g, const float *x, const float *y,
                                  const int8_t *mask, const float *mean, const float *invstd, float *gr, float *coef,
                                  float *dgamma, float *dbeta) {
  const int64_t P = layer->pixels, C = layer->channels;
  if (P < 1 || C < 1 || layer->threads < 1 || !y != !gr || (mask && y)) return KERNEL_INVALID;
  double *sums = kernel_malloc(sizeof(double) * (size_t)(2 * C));
  float *a = coef, *b = coef + C, *e = coef + 2 * C, *f = coef + 3 * C;
  scale_shift(layer->gamma, layer->beta, mean, invstd, C, a, b);
  const tensors t = {x, g, y, a, b, mean, gr, mask, C};
  const int status = sums ? reduce(masked_sums, &t, P, C, sums, (int)layer->threads) : KERNEL_NO_MEMORY;
  if (status != KERNEL_OK) {
    free(sums);
    return status;
  }
  for (int64_t c = 0; c < C; ++c) {
    const double db = sums[c], dg = invstd[c] * sums[C + c];
    const double ed = -(double)a[c] * invstd[c] * dg / P;
    dbeta[c] = (float)db;
    dgamma[c] = (float)dg;
    e[c] = (float)ed;
    f[c] = (float)(-(double)a[c] * db / P - ed * mean[c]);
  }
  free(sums);
  return KERNEL_OK;
}

/* dx, dgamma, dbeta and dr = gr (with a residual): bn_relu_backward_coefficients, then the elementwise pass.
   Returns an error code (kernels.h). */
int bn_relu_backward(const bn_layer *layer, const float *g, const float *x, const float *y, const float *mean,
                     const float *invstd, float *gr, float *dx, float *dgamma, float *dbeta) {
  const int64_t P = layer->pixels, C = layer->channels;
  if (P < 1 || C < 1) return KERNEL_INVALID;
  float *coef = kernel_malloc(sizeof(float) * (size_t)(4 * C));
  const int status = coef ? bn_relu_backward_coefficients(layer, g, x, y, NULL, mean, invstd, gr, coef, dgamma, dbeta)
                          : KERNEL_NO_MEMORY;
  if (status != KERNEL_OK) {
    free(coef);
    return status;
  }
  const float *e = coef + 2 * C, *f = coef + 3 * C;
  const tensors t = {x, g, y, coef, coef + C, mean, gr, NULL, C};
#pragma omp parallel for num_threads((int)layer->threads) schedule(static)
  for (int64_t p0 = 0; p0 < P; p0 += BLOCK) {
    const int64_t p1 = p0 + BLOCK < P ? p0 + BLOCK : P;
#define INPUT_GRAD(c0, width)                                                                                    \
  (y ? input_grad_chunk(&t, e, f, dx, p0, p1, c0, width, 1) : input_grad_chunk(&t, e, f, dx, p0, p1, c0, width, 0))
    FOR_CHUNKS(INPUT_GRAD);
#undef INPUT_GRAD
  }
  free(coef);
  return KERNEL_OK;
}
