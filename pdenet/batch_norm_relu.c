/* Batch normalization in training mode followed by ReLU, with an optional residual added before the ReLU, for
   float32 channels-last tensors: x, r, y (P, C) with P = B H W pixels and the C channels contiguous.

   forward:  mean_c = sum_p x / P, var_c = sum_p (x - mean)^2 / P, invstd = 1 / sqrt(var + eps),
             a = gamma invstd, b = beta - mean a, y = max(0, a x + b [+ r]);
             running_mean += momentum (mean - running_mean), running_var likewise with var P / (P - 1).
   backward: gm = g [y > 0] (the mask from y, or recomputed as a x + b > 0 without a residual), dr = gm,
             dbeta = sum_p gm, dgamma = sum_p gm xhat = invstd sum_p gm (x - mean),
             dx = a (gm - dbeta / P - xhat dgamma / P) = a gm + e x + f.

   Two passes each way (a reduction, then an elementwise pass), split over OpenMP threads by blocks of pixels.
   The reductions sum in float over a block, in double across blocks, and across threads in thread order, so
   the result does not depend on the schedule; they sum x - k (k = the first pixel's x) and gm (x - mean), so
   that a mean large against the spread loses no precision. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64 /* pixels per float partial sum */

/* a x + b, the same rounding in the forward and in the backward's recomputed mask */
static inline float affine(float x, float a, float b) { return __builtin_fmaf(x, a, b); }

/* max(0, v), NaN kept (as torch.relu) */
static inline float relu(float v) { return v < 0.f ? 0.f : v; }

/* out[c] = sum_p u(p, c), out[C + c] = sum_p v(p, c) over the P pixels, where `pass` adds one block's terms
   into the float sums (su, sv); per thread in double, then in thread order. */
typedef void (*block_sums)(const void *args, int64_t p0, int64_t p1, float *su, float *sv);

static int reduce(block_sums pass, const void *args, int64_t P, int64_t C, double *out, int nthreads) {
  double *partial = calloc((size_t)(nthreads * 2 * C), sizeof(double));
  if (!partial) return 0;
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    double *mine = partial + (size_t)omp_get_thread_num() * 2 * C;
    float *s = malloc(sizeof(float) * (size_t)(2 * C));
    if (!s) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t p0 = 0; p0 < P; p0 += BLOCK) {
      if (!s) continue;
      memset(s, 0, sizeof(float) * (size_t)(2 * C));
      pass(args, p0, p0 + BLOCK < P ? p0 + BLOCK : P, s, s + C);
      for (int64_t c = 0; c < 2 * C; ++c) mine[c] += s[c];
    }
    free(s);
  }
  memset(out, 0, sizeof(double) * (size_t)(2 * C));
  for (int t = 0; t < nthreads; ++t)
    for (int64_t c = 0; c < 2 * C; ++c) out[c] += partial[(size_t)t * 2 * C + c];
  free(partial);
  return !failed;
}

typedef struct {
  const float *x, *g, *y, *a, *b, *shift;
  float *gr;
  int64_t C;
} tensors;

/* su += x - k, sv += (x - k)^2 with k = shift */
static void moments(const void *args, int64_t p0, int64_t p1, float *su, float *sv) {
  const tensors *t = args;
  const int64_t C = t->C;
  for (int64_t p = p0; p < p1; ++p) {
    const float *xp = t->x + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float u = xp[c] - t->shift[c];
      su[c] += u;
      sv[c] += u * u;
    }
  }
}

/* gm = g [mask]; su += gm, sv += gm (x - mean) with mean = shift; gm stored to gr when it is wanted (the
   residual's gradient) */
static void masked_sums(const void *args, int64_t p0, int64_t p1, float *su, float *sv) {
  const tensors *t = args;
  const int64_t C = t->C;
  for (int64_t p = p0; p < p1; ++p) {
    const float *xp = t->x + p * C, *gp = t->g + p * C;
    if (t->y) {
      const float *yp = t->y + p * C;
      float *rp = t->gr ? t->gr + p * C : NULL;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float gm = yp[c] > 0.f ? gp[c] : 0.f;
        if (rp) rp[c] = gm;
        su[c] += gm;
        sv[c] += gm * (xp[c] - t->shift[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float gm = affine(xp[c], t->a[c], t->b[c]) > 0.f ? gp[c] : 0.f;
        su[c] += gm;
        sv[c] += gm * (xp[c] - t->shift[c]);
      }
    }
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

/* y = max(0, a x + b [+ r]); save_mean and save_invstd (C) are kept for the backward. Running statistics are
   updated when running_mean is not NULL. Returns 0 on failure (P < 1 or no memory), writing nothing. */
int bn_relu_forward(const float *x, const float *r, const float *gamma, const float *beta, float *running_mean,
                    float *running_var, double momentum, double eps, float *y, float *save_mean,
                    float *save_invstd, int64_t P, int64_t C, int nthreads) {
  if (P < 1 || C < 1) return 0;
  double *sums = malloc(sizeof(double) * (size_t)(2 * C));
  float *a = malloc(sizeof(float) * (size_t)(2 * C)), *b = a ? a + C : NULL;
  const tensors t = {x, NULL, NULL, NULL, NULL, x, NULL, C}; /* shifted by the first pixel */
  if (!sums || !a || !reduce(moments, &t, P, C, sums, nthreads)) {
    free(sums);
    free(a);
    return 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const double shifted = sums[c] / P, mean = x[c] + shifted, var = fmax(sums[C + c] / P - shifted * shifted, 0.0);
    save_mean[c] = (float)mean;
    save_invstd[c] = (float)(1.0 / sqrt(var + eps));
    if (running_mean) {
      running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean);
      running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * var * P / (P > 1 ? P - 1 : 1));
    }
  }
  scale_shift(gamma, beta, save_mean, save_invstd, C, a, b);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t p0 = 0; p0 < P; p0 += BLOCK) {
    const int64_t p1 = p0 + BLOCK < P ? p0 + BLOCK : P;
    for (int64_t p = p0; p < p1; ++p) {
      const float *xp = x + p * C;
      float *yp = y + p * C;
      if (r) {
        const float *rp = r + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yp[c] = relu(affine(xp[c], a[c], b[c]) + rp[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yp[c] = relu(affine(xp[c], a[c], b[c]));
      }
    }
  }
  free(sums);
  free(a);
  return 1;
}

/* dx, dgamma, dbeta (and dr = gr when the forward had a residual; then y is its output, which gives the mask)
   from the output gradient g, the input x and the forward's saved mean and invstd. Returns 0 on failure. */
int bn_relu_backward(const float *g, const float *x, const float *y, const float *gamma, const float *beta,
                     const float *mean, const float *invstd, float *gr, float *dx, float *dgamma, float *dbeta,
                     int64_t P, int64_t C, int nthreads) {
  if (P < 1 || C < 1) return 0;
  double *sums = malloc(sizeof(double) * (size_t)(2 * C));
  float *coef = malloc(sizeof(float) * (size_t)(4 * C));
  if (!sums || !coef) {
    free(sums);
    free(coef);
    return 0;
  }
  float *a = coef, *b = coef + C, *e = coef + 2 * C, *f = coef + 3 * C;
  scale_shift(gamma, beta, mean, invstd, C, a, b);
  const tensors t = {x, g, y, a, b, mean, gr, C};
  if (!reduce(masked_sums, &t, P, C, sums, nthreads)) {
    free(sums);
    free(coef);
    return 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const double db = sums[c], dg = invstd[c] * sums[C + c];
    const double ed = -(double)a[c] * invstd[c] * dg / P;
    dbeta[c] = (float)db;
    dgamma[c] = (float)dg;
    e[c] = (float)ed;
    f[c] = (float)(-(double)a[c] * db / P - ed * mean[c]);
  }
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t p0 = 0; p0 < P; p0 += BLOCK) {
    const int64_t p1 = p0 + BLOCK < P ? p0 + BLOCK : P;
    for (int64_t p = p0; p < p1; ++p) {
      const float *xp = x + p * C, *gp = g + p * C;
      float *dp = dx + p * C;
      if (y) {
        const float *yp = y + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dp[c] = (yp[c] > 0.f ? gp[c] : 0.f) * a[c] + xp[c] * e[c] + f[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          dp[c] = (affine(xp[c], a[c], b[c]) > 0.f ? gp[c] : 0.f) * a[c] + xp[c] * e[c] + f[c];
      }
    }
  }
  free(sums);
  free(coef);
  return 1;
}
