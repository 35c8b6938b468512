/* The lean operator's CPU kernels, float32, channels-last: y = P x + S x in one pass over x and y, and its
   backward (the input gradient P^T d + S^T d and the weight gradients of P and S) in one pass over the output
   gradient d and x.

   Layout: x (B, H, W, ci) and y (B, H, W, co) with the channels contiguous (PyTorch's channels-last);
   pixels are numbered p = (b H + h) W + w. P couples the channels in `groups` groups: output channel j of
   group G = j / (co/groups) reads input channels G cig + c, c < cig = ci/groups. Its weights arrive in
   PyTorch's layout, p[j cig + c] = P[j, c] (shape (co, cig)), and the forward transposes them once per call
   to pt[c co + j] (shape (cig, co)), so that a row of pt is contiguous in j. The stencil S acts on the
   channels j < m (m <= ci, co): (S x)_j(p) = sum_t s[j, t] x_j(p + (dy_t, dx_t)), with the taps t given by
   their index taps[t] = (dy_t + r) k + (dx_t + r) in the k x k square (r = k / 2); its weights arrive as
   s[j ntaps + t] (shape (m, ntaps)) and are transposed to wt[t m + j]. Outside the grid x is zero
   (circular = 0) or periodic.

   The kernels work on tiles of TILE consecutive pixels, split over OpenMP threads (the same OpenMP runtime
   as PyTorch's, libgomp). Inside a tile a register block of WIDE pixels (MR for the tile's last few, and on
   AVX2 for two vectors) x nv VW channels (nv = 2 vectors, or 1 for a remainder of VW channels: 16-channel
   layers with AVX-512) accumulates the GEMM and the stencil taps before a single store, so x is read and y
   written once; narrower remainders run a scalar loop. The taps one image row down are prefetched PREFETCH_LEAD
   pixels beyond the next block: they are the first touch of that row and would otherwise stall the block. The
   weight gradients sum over a tile's pixels in registers: the coupling's, transposed to (cig, co) so that its
   rows are contiguous like d, in blocks of up to GRAD_ROWS(nv) input channels x nv VW output channels; the
   stencil's up to TAPS_PER_PASS taps at once (independent sums, each d read once).
   For a batch norm after the operator, the forward can sum its output's moments over each tile just stored
   (still in cache), and the backward can compute batch norm's output gradient d tile by tile (lean_backward with
   a bn_gradient). For a residual block's shortcut, the backward's register blocks can add the shortcut's gradient
   to dx as they store it. Errors and allocation follow kernels.h. */
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

#define MR 6        /* pixels (forward) or input channels (weight gradient) per register block */
#define NR (2 * VW) /* channels per full register block (nv = 2 vectors) */
#define WIDE 12     /* pixels or input channels per wide register block: 2 MR */
#define TILE 96     /* pixels per tile, a multiple of WIDE */
#define PREFETCH_LEAD 48 /* pixels beyond the next register block at which the row r below is prefetched */
/* input channels per register block of the coupling's gradient with nv vectors: WIDE where its 2 WIDE + 3 vector
   registers fit (nv = 1, or AVX-512's 32 registers), else MR */
#define GRAD_ROWS(nv) ((nv) == 1 || VW == 16 ? WIDE : MR)


typedef struct {
  int64_t B, H, W, ci, co, m, k, groups, cig, cog;
  int circular, ntaps;
  int64_t dy[81], dx[81];
} geometry;

/* The kernels' geometry of the operator `shape` states, or with `adjoint` of its adjoint x = P^T y + S^T y (the
   channels swapped, the taps flipped); 0 for a shape outside the kernels' range. */
static int make_geometry(geometry *g, const lean_shape *shape, int adjoint) {
  const int64_t k = shape->kernel_size, groups = shape->groups, m = shape->stencil_channels;
  const int64_t ci = adjoint ? shape->out_channels : shape->in_channels;
  const int64_t co = adjoint ? shape->in_channels : shape->out_channels;
  if (shape->ntaps < 0 || shape->ntaps > 81 || k < 1 || k > 9 || groups < 1 || ci % groups || co % groups || m > ci
      || m > co || shape->batch < 0 || shape->height < 1 || shape->width < 1 || shape->threads < 1)
    return 0;
  *g = (geometry){shape->batch, shape->height, shape->width, ci, co, m, k, groups, ci / groups, co / groups,
                  shape->circular != 0, (int)shape->ntaps, {0}, {0}};
  for (int t = 0; t < g->ntaps; ++t) {
    const int64_t tap = adjoint ? k * k - 1 - shape->taps[t] : shape->taps[t];
    if (tap < 0 || tap >= k * k) return 0;
    g->dy[t] = tap / k - k / 2;
    g->dx[t] = tap % k - k / 2;
  }
  return 1;
}

/* src[t TILE + i]: the pixel (pitch ci) that tap t reads for pixel p0 + i, or `zero` off a zero-padded grid;
   pixel q is at x + (q - origin) ci (origin > 0: a window of the tensor, holding every pixel read). Interior
   pixels come in runs along a row, written tap by tap (contiguous stores the compiler vectorizes);
   the pixels within r of the grid's edge are resolved one at a time. */
static void tile_sources(const geometry *g, const float *x, int64_t origin, const float *zero, int64_t p0,
                         int64_t n, const float **src) {
  const int64_t W = g->W, H = g->H, ci = g->ci, r = g->k / 2;
  int64_t off[81];
  for (int t = 0; t < g->ntaps; ++t) off[t] = (g->dy[t] * W + g->dx[t]) * ci;
  int64_t w = p0 % W, h = (p0 / W) % H;
  for (int64_t i = 0; i < n;) {
    const float *centre = x + (p0 + i - origin) * ci;
    if (h >= r && h < H - r && w >= r && w < W - r) { /* interior: every tap inside the grid */
      const int64_t run = W - r - w < n - i ? W - r - w : n - i; /* up to the row's last interior pixel */
      for (int t = 0; t < g->ntaps; ++t) {
        const float **out = src + t * TILE + i, *first = centre + off[t];
        for (int64_t q = 0; q < run; ++q) out[q] = first + q * ci;
      }
      i += run;
      w += run;
    } else {
      for (int t = 0; t < g->ntaps; ++t) {
        const int64_t hh = h + g->dy[t], ww = w + g->dx[t];
        if (hh >= 0 && hh < H && ww >= 0 && ww < W) {
          src[t * TILE + i] = centre + off[t];
        } else if (g->circular) {
          const int64_t hw = ((hh % H) + H) % H, wr = ((ww % W) + W) % W;
          src[t * TILE + i] = centre + ((hw - h) * W + (wr - w)) * ci;
        } else {
          src[t * TILE + i] = zero;
        }
      }
      ++i;
      ++w;
    }
    if (w == W) {
      w = 0;
      if (++h == H) h = 0;
    }
  }
}

/* The pixels [p + w + L, p + 2 w + L) r rows down (L = PREFETCH_LEAD), for a block of w pixels at p: the lowest
   taps of a block L pixels after the next one, early enough for their memory latency (x from pixel origin to
   end). */
static inline void prefetch_ahead(const geometry *g, const float *x, int64_t origin, int64_t end, int64_t p,
                                  int64_t w) {
  const int64_t q0 = p + w + (g->k / 2) * g->W + PREFETCH_LEAD, q1 = q0 + w < end ? q0 + w : end;
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t c = 0; c < g->ci; c += 64 / sizeof(float)) __builtin_prefetch(x + (q - origin) * g->ci + c);
}

/* o[0 : nv VW] += (v0, v1), the second vector only when nv = 2 */
static inline void accumulate(float *o, vec v0, vec v1, const int nv) {
  vstore(o, vload(o) + v0);
  if (nv > 1) vstore(o + VW, vload(o + VW) + v1);
}

/* v where the VW bytes at m are set (-1), else 0 */
static inline vec keep_where_set(const int8_t *m, vec v) { return keep_where(widen_mask(m), v); }

/* max(v, 0) */
static inline vec relu(vec v) { return keep_where(v > (vec){0}, v); }

/* sums[j] += sum_{i < n} (y_ij - k_j), sums[co + j] += sum_i (y_ij - k_j)^2 for a tile's output y (pitch co) and a
   shift k (co), in float, from cache after the tile's stores (summed in the register blocks, they would spill
   the blocks' sums of y with AVX2's 16 registers). Two pixels at a time: independent sums. */
static void tile_moments(const float *y, int64_t n, int64_t co, const float *shift, float *sums) {
  int64_t j = 0;
  for (; j + VW <= co; j += VW) {
    const vec k = vload(shift + j);
    vec u0 = {0}, u1 = {0}, v0 = {0}, v1 = {0};
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      const vec e0 = vload(y + i * co + j) - k, e1 = vload(y + (i + 1) * co + j) - k;
      u0 += e0, v0 += e0 * e0, u1 += e1, v1 += e1 * e1;
    }
    if (i < n) {
      const vec e0 = vload(y + i * co + j) - k;
      u0 += e0, v0 += e0 * e0;
    }
    vstore(sums + j, vload(sums + j) + u0 + u1);
    vstore(sums + co + j, vload(sums + co + j) + v0 + v1);
  }
  for (; j < co; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const float e = y[i * co + j] - shift[j];
      sums[j] += e;
      sums[co + j] += e * e;
    }
}

/* ------------------------------------------------------------------------------------------- forward */
/* y[i, j0 : j0 + nv VW] = sum_c a[i, c] pt[c, j0 :] + sum_{t < ntaps} wt[t, j0 :] src[t][i][j0 :] for the
   pixels i < mr, plus ad's channels; `a` points at input channel G cig of the block's first pixel q. rows (MR or
   WIDE, with mr = WIDE for WIDE) and nv (1 or 2) are constants at every call, so each shape compiles to its own
   code: rows nv accumulators, WIDE rows where 2 WIDE + 2 registers fit (nv = 1, or nv = 2 with AVX-512), enough
   independent sums to cover the FMA's latency on both ports. */
static inline __attribute__((always_inline)) void forward_block(const geometry *g, const float *a, const float *pt,
                                                                const float *wt, int ntaps, const float *const *src,
                                                                int64_t j0, int64_t q, float *y, int mr,
                                                                const int rows, const int nv, const epilogue *ep) {
  vec c[WIDE][2];
  const float *row[WIDE]; /* pixels past mr repeat pixel 0: computed, never stored */
  const int64_t ci = g->ci, co = g->co;
#pragma GCC unroll 12
  for (int i = 0; i < rows; ++i) {
    c[i][0] = c[i][1] = (vec){0};
    row[i] = a + (i < mr) * i * ci;
  }
  const float *b = pt + j0;
  for (int64_t k = 0; k < g->cig; ++k, b += co) {
    const vec b0 = vload(b), b1 = nv > 1 ? vload(b + VW) : b0;
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i) {
      const vec s = vsplat(row[i][k]);
      c[i][0] += s * b0;
      if (nv > 1) c[i][1] += s * b1;
    }
  }
  for (int t = 0; t < ntaps; ++t) {
    const vec w0 = vload(wt + t * g->m + j0), w1 = nv > 1 ? vload(wt + t * g->m + j0 + VW) : w0;
    const float *const *st = src + t * TILE;
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i) {
      const float *s = st[(i < mr) * i] + j0;
      c[i][0] += w0 * vload(s);
      if (nv > 1) c[i][1] += w1 * vload(s + VW);
    }
  }
  if (ep && ep->add.add) { /* y_j += add_j [mask_j] over the block's mr pixels */
    const float *add = ep->add.add + q * ep->add.pitch + j0;
    const int8_t *keep = ep->add.mask ? ep->add.mask + q * ep->add.pitch + j0 : NULL;
    const int64_t pitch = ep->add.pitch;
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i)
      if (i < mr) {
        const vec add0 = vload(add + i * pitch), add1 = nv > 1 ? vload(add + i * pitch + VW) : add0;
        c[i][0] += keep ? keep_where_set(keep + i * pitch, add0) : add0;
        if (nv > 1) c[i][1] += keep ? keep_where_set(keep + i * pitch + VW, add1) : add1;
      }
  }
  if (ep && ep->bias) {
    const vec b0 = vload(ep->bias + j0), b1 = nv > 1 ? vload(ep->bias + j0 + VW) : b0;
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i) {
      c[i][0] += b0;
      if (nv > 1) c[i][1] += b1;
    }
  }
  if (ep && ep->relu) {
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i) {
      c[i][0] = relu(c[i][0]);
      if (nv > 1) c[i][1] = relu(c[i][1]);
    }
  }
  y += j0;
#pragma GCC unroll 12
  for (int i = 0; i < rows; ++i)
    if (i < mr) {
      vstore(y + i * co, c[i][0]);
      if (nv > 1) vstore(y + i * co + VW, c[i][1]);
    }
}

/* The same for the output channels j0 <= j < j1 one at a time (blocks cut by co, m or a group boundary). */
static void forward_scalar(const geometry *g, const float *x_pixel, const float *pt, const float *wt,
                           const float *const *src, int64_t j0, int64_t j1, int64_t q, float *y, int mr,
                           const epilogue *ep) {
  for (int i = 0; i < mr; ++i)
    for (int64_t j = j0; j < j1; ++j) {
      const float *a = x_pixel + i * g->ci + (j / g->cog) * g->cig;
      float acc = 0.f;
      for (int64_t c = 0; c < g->cig; ++c) acc += a[c] * pt[c * g->co + j];
      if (j < g->m)
        for (int t = 0; t < g->ntaps; ++t) acc += wt[t * g->m + j] * src[t * TILE + i][j];
      if (ep) {
        const int64_t at = (q + i) * ep->add.pitch + j;
        if (ep->add.add && (!ep->add.mask || ep->add.mask[at])) acc += ep->add.add[at];
        if (ep->bias) acc += ep->bias[j];
        if (ep->relu && !(acc > 0.f)) acc = 0.f;
      }
      y[i * g->co + j] = acc;
    }
}

/* Whether output channels j0 .. j0 + width - 1 form a register block: inside co and inside one group, and
   either all stencil channels (< m) or none. */
static inline int block_fits(const geometry *g, int64_t j0, int64_t width) {
  const int64_t j1 = j0 + width;
  return j1 <= g->co && (j1 - 1) / g->cog == j0 / g->cog && !(j0 < g->m && g->m < j1);
}

/* The first channel after j0 where a block may start again: the next of co, m and a group boundary. */
static inline int64_t next_boundary(const geometry *g, int64_t j0) {
  int64_t j1 = (j0 / g->cog + 1) * g->cog;
  if (j0 < g->m && g->m < j1) j1 = g->m;
  return j1 < g->co ? j1 : g->co;
}

/* The output channels in register blocks, the same for every pixel block: [j0, next j0) with nv vectors (0: the
   scalar loop), reading input channels from `input` on, with the stencil's taps or none. */
typedef struct {
  int64_t j0, input;
  int nv, ntaps;
} channel_block;

/* The blocks of g's output channels, ended by a block with j0 = co; NULL without memory (the caller frees). */
static channel_block *plan_blocks(const geometry *g) {
  channel_block *plan = kernel_malloc(sizeof(channel_block) * (size_t)(g->co + 1)), *b = plan;
  if (!plan) return NULL;
  for (int64_t j0 = 0; j0 < g->co; ++b) {
    const int nv = block_fits(g, j0, NR) ? 2 : block_fits(g, j0, VW) ? 1 : 0;
    *b = (channel_block){j0, j0 / g->cog * g->cig, nv, j0 < g->m ? g->ntaps : 0};
    j0 = nv ? j0 + nv * VW : next_boundary(g, j0);
  }
  *b = (channel_block){g->co, 0, 0, 0};
  return plan;
}

/* The tile of n pixels from p0: y = P x + S x there, channel block by channel block of `plan` (src: the tile's
   tap table, filled here; x holds the pixels [origin, end), pixel q at x + (q - origin) ci). */
static void forward_tile(const geometry *g, const channel_block *plan, const float *x, int64_t origin, int64_t end,
                         const float *pt, const float *wt, const float *zero, const float **src, int64_t p0,
                         int64_t n, float *y, const epilogue *ep) {
  const int64_t ci = g->ci, co = g->co;
  tile_sources(g, x, origin, zero, p0, n, src);
  for (int64_t i = 0; i < n;) {
    const int wide = n - i >= WIDE, mr = (int)(wide ? WIDE : n - i < MR ? n - i : MR);
    const float *x_pixel = x + (p0 + i - origin) * ci;
    float *y_pixel = y + (p0 + i) * co;
    prefetch_ahead(g, x, origin, end, p0 + i, mr);
    for (const channel_block *b = plan; b->j0 < co; ++b) {
      const float *a = x_pixel + b->input;
      const int64_t j0 = b->j0, q = p0 + i;
      if (b->nv == 0) {
        forward_scalar(g, x_pixel, pt, wt, src + i, j0, b[1].j0, q, y_pixel, mr, ep);
      } else if (!wide) {
        if (b->nv == 2) forward_block(g, a, pt, wt, b->ntaps, src + i, j0, q, y_pixel, mr, MR, 2, ep);
        else forward_block(g, a, pt, wt, b->ntaps, src + i, j0, q, y_pixel, mr, MR, 1, ep);
      } else if (b->nv == 1) {
        forward_block(g, a, pt, wt, b->ntaps, src + i, j0, q, y_pixel, WIDE, WIDE, 1, ep);
      } else if (VW == 16) { /* AVX-512: 24 accumulators fit its 32 registers */
        forward_block(g, a, pt, wt, b->ntaps, src + i, j0, q, y_pixel, WIDE, WIDE, 2, ep);
      } else { /* AVX2: two blocks of MR pixels */
        forward_block(g, a, pt, wt, b->ntaps, src + i, j0, q, y_pixel, MR, MR, 2, ep);
        forward_block(g, a + MR * ci, pt, wt, b->ntaps, src + i + MR, j0, q + MR, y_pixel + MR * co, MR, MR, 2,
                      ep);
      }
    }
    i += mr;
  }
}

/* The weights of y = P x + S x (p: P (co, cig), s: (m, ntaps), PyTorch's layouts) in the layouts of the
   forward's tile: pt (cig, co), or for the adjoint x = P^T y + S^T y (its geometry: ci and co swapped, taps
   flipped) pt (cog, ci) with pt[c, j] = P[G cog + c, j - G cig], G = j / cig; and wt (ntaps, m). NULL without
   memory; pt holds wt too (the caller frees pt). */
static float *tile_weights(const geometry *g, const float *p, const float *s, int adjoint, float **wt) {
  const int64_t ci = g->ci, co = g->co, cig = g->cig, cog = g->cog, m = g->m;
  float *pt = kernel_malloc(sizeof(float) * (size_t)(cig * co + g->ntaps * m + 1));
  if (!pt) return NULL;
  *wt = pt + cig * co;
  for (int64_t j = 0; j < co; ++j)
    for (int64_t c = 0; c < cig; ++c) {
      if (adjoint) {
        const int64_t G = j / cog; /* P's row j = G cog + r feeds the adjoint's output channel G cig + c */
        pt[(j - G * cog) * ci + G * cig + c] = p[j * cig + c];
      } else {
        pt[c * co + j] = p[j * cig + c];
      }
    }
  for (int64_t j = 0; j < m; ++j)
    for (int t = 0; t < g->ntaps; ++t) (*wt)[t * m + j] = s[j * g->ntaps + t];
  return pt;
}

/* Scratch memory for `threads` threads, `bytes` each (rounded up to a cache line, *pitch), zeroed: one checked
   allocation before a parallel region, so that nothing inside it allocates. */
static char *thread_scratch(int threads, size_t bytes, size_t *pitch) {
  *pitch = (bytes + 63) / 64 * 64;
  return kernel_calloc((size_t)threads, *pitch);
}

/* y = P x + S x, or with ep (NULL for none) y = act(P x + S x + add [mask] + bias) as its register blocks store it
   (an add of pitch >= co), and, unless out is NULL, the moments of y about shift (co): out[j] = sum_p (y_j(p) -
   shift_j), out[co + j] = sum_p (y_j(p) - shift_j)^2, summed in float over a tile, in double across tiles and
   across threads in thread order (batch norm's statistics, with the running mean as the shift). Returns an error
   code (kernels.h). */
int lean_forward(const lean_shape *shape, const float *x, const float *p, const float *s, const epilogue *ep,
                 float *y, const float *shift, double *out) {
  geometry g;
  if (!make_geometry(&g, shape, 0) || (ep && ep->add.add && ep->add.pitch < g.co)) return KERNEL_INVALID;
  const int nthreads = (int)shape->threads, ntaps = g.ntaps;
  const int64_t co = g.co, pixels = g.B * g.H * g.W, tiles = (pixels + TILE - 1) / TILE;
  float *wt, *pt = tile_weights(&g, p, s, 0, &wt);
  channel_block *plan = plan_blocks(&g);
  double *partial = out ? kernel_calloc((size_t)(nthreads * 2 * co), sizeof(double)) : NULL;
  /* per thread: the tap table (ntaps x TILE pointers), zeros for the taps off a zero-padded grid, a tile's sums */
  const size_t table = sizeof(float *) * (size_t)(ntaps > 0 ? ntaps : 1) * TILE, zeros = sizeof(float) * (co + NR);
  size_t pitch;
  char *scratch = thread_scratch(nthreads, table + zeros + sizeof(float) * (size_t)(2 * co), &pitch);
  const int failed = !pt || !plan || !scratch || (out && !partial);
  if (!failed) {
#pragma omp parallel num_threads(nthreads)
    {
      char *mine_scratch = scratch + (size_t)omp_get_thread_num() * pitch;
      const float **src = (const float **)mine_scratch;
      float *zero = (float *)(mine_scratch + table), *sums = zero + co + NR;
      double *mine = out ? partial + (size_t)omp_get_thread_num() * 2 * co : NULL;
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t p0 = tile * TILE, n = pixels - p0 < TILE ? pixels - p0 : TILE;
        forward_tile(&g, plan, x, 0, pixels, pt, wt, zero, src, p0, n, y, ep);
        if (out) {
          tile_moments(y + p0 * co, n, co, shift, sums);
          for (int64_t j = 0; j < 2 * co; ++j) mine[j] += sums[j];
          memset(sums, 0, sizeof(float) * (size_t)(2 * co));
        }
      }
    }
  }
  if (out && !failed) {
    memset(out, 0, sizeof(double) * (size_t)(2 * co));
    for (int t = 0; t < nthreads; ++t)
      for (int64_t j = 0; j < 2 * co; ++j) out[j] += partial[(size_t)t * 2 * co + j];
  }
  free(scratch);
  free(partial);
  free(plan);
  free(pt);
  return failed ? KERNEL_NO_MEMORY : KERNEL_OK;
}

/* --------------------------------------------------------------------------------- weight gradients */
/* gq[c0 + u, j0 : j0 + nv VW] += sum_{i < n} a[i, c0 + u] d[i, j0 :] for u < nc: the coupling's gradient
   transposed (gq[c, j] = gp[j, c], shape (cig, co), contiguous in j like d), where d points at the output
   gradient of the tile's first pixel and a at input channel G cig of the same pixel. The nc broadcasts come
   from one pixel at fixed offsets; nc (<= GRAD_ROWS(nv)) and nv (1 or 2) are constants at every call. */
static inline __attribute__((always_inline)) void pointwise_grad_block(const geometry *g, const float *d,
                                                                       const float *a, int64_t n, int64_t j0,
                                                                       int64_t c0, float *gq, const int nc,
                                                                       const int nv) {
  vec acc[WIDE][2];
#pragma GCC unroll 12
  for (int u = 0; u < nc; ++u) acc[u][0] = acc[u][1] = (vec){0};
  const int64_t ci = g->ci, co = g->co;
  d += j0;
  a += c0;
  for (int64_t i = 0; i < n; ++i, d += co, a += ci) {
    const vec d0 = vload(d), d1 = nv > 1 ? vload(d + VW) : d0;
#pragma GCC unroll 12
    for (int u = 0; u < nc; ++u) {
      const vec s = vsplat(a[u]);
      acc[u][0] += s * d0;
      if (nv > 1) acc[u][1] += s * d1;
    }
  }
#pragma GCC unroll 12
  for (int u = 0; u < nc; ++u) accumulate(gq + (c0 + u) * co + j0, acc[u][0], acc[u][1], nv);
}

/* pointwise_grad_block for the input channels c0 .. c0 + nc - 1 of group G, any nc <= GRAD_ROWS(nv). */
static inline __attribute__((always_inline)) void pointwise_grad_channels(const geometry *g, const float *d,
                                                                          const float *a, int64_t n, int64_t j0,
                                                                          int64_t c0, float *gq, int nc,
                                                                          const int nv) {
#define CASE(r)                                                                                                  \
  case r: pointwise_grad_block(g, d, a, n, j0, c0, gq, r, nv); break;
  if (GRAD_ROWS(nv) > MR) {
    switch (nc) {
      CASE(12) CASE(11) CASE(10) CASE(9) CASE(8) CASE(7) default: break;
    }
    if (nc > MR) return;
  }
  switch (nc) {
    CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) default: pointwise_grad_block(g, d, a, n, j0, c0, gq, 1, nv); break;
  }
#undef CASE
}

/* gs[t0 + u, j0 : j0 + nv VW] += sum_{i < n} d[i, j0 :] src[t0 + u][i][j0 :] for u < tn (tn <= TAPS_PER_PASS
   taps at once: independent accumulators, d loaded once per pixel); nv and tn are constants at every call. */
#define TAPS_PER_PASS 5
#define PREFETCH_PIXELS 16
static inline __attribute__((always_inline)) void stencil_grad_taps(const geometry *g, const float *d,
                                                                    const float *const *src, int64_t n, int64_t j0,
                                                                    int t0, float *gs, const int tn, const int nv) {
  vec acc[TAPS_PER_PASS][2];
  for (int u = 0; u < tn; ++u) acc[u][0] = acc[u][1] = (vec){0};
  const float *const *st = src + t0 * TILE;
  for (int64_t i = 0; i < n; ++i, d += g->co) {
    __builtin_prefetch(d + PREFETCH_PIXELS * g->co + j0); /* the first touch of d in the tile */
    if (nv > 1) __builtin_prefetch(d + PREFETCH_PIXELS * g->co + j0 + VW);
    const vec d0 = vload(d + j0), d1 = nv > 1 ? vload(d + j0 + VW) : d0;
    for (int u = 0; u < tn; ++u) {
      const float *s = st[u * TILE + i] + j0;
      acc[u][0] += d0 * vload(s);
      if (nv > 1) acc[u][1] += d1 * vload(s + VW);
    }
  }
  for (int u = 0; u < tn; ++u) accumulate(gs + (t0 + u) * g->m + j0, acc[u][0], acc[u][1], nv);
}

/* All taps of the stencil gradient for the channels j0 .. j0 + nv VW - 1, TAPS_PER_PASS taps per pass over the
   tile's pixels. */
static inline __attribute__((always_inline)) void stencil_grad_channels(const geometry *g, const float *d,
                                                                        const float *const *src, int64_t n,
                                                                        int64_t j0, float *gs, const int nv) {
  int t = 0;
  for (; t + TAPS_PER_PASS <= g->ntaps; t += TAPS_PER_PASS)
    stencil_grad_taps(g, d, src, n, j0, t, gs, TAPS_PER_PASS, nv);
  switch (g->ntaps - t) {
    case 4: stencil_grad_taps(g, d, src, n, j0, t, gs, 4, nv); break;
    case 3: stencil_grad_taps(g, d, src, n, j0, t, gs, 3, nv); break;
    case 2: stencil_grad_taps(g, d, src, n, j0, t, gs, 2, nv); break;
    case 1: stencil_grad_taps(g, d, src, n, j0, t, gs, 1, nv); break;
    default: break;
  }
}

/* The tile of n pixels from p0: gq_local (cig, co) += its terms of the coupling's gradient, transposed, and
   gs_local (ntaps, m) += its terms of the stencil's, for the output gradient d_tile of the tile's pixels (src:
   the tile's tap table over x, filled here). */
static void weight_grad_tile(const geometry *g, const float *d_tile, const float *x, const float *zero,
                             const float **src, int64_t p0, int64_t n, float *gq_local, float *gs_local) {
  const int64_t pixels = g->B * g->H * g->W, ci = g->ci, co = g->co, m = g->m, cig = g->cig, cog = g->cog;
  const int ntaps = g->ntaps;
  const float *x_tile = x + p0 * ci;
  tile_sources(g, x, 0, zero, p0, n, src);
  /* the stencil: gs[t, j] += sum_i d[i, j] src[t][i][j], channels in register blocks over the tile */
  for (int64_t i = 0; i < n; i += MR) prefetch_ahead(g, x, 0, pixels, p0 + i, MR);
  int64_t js = 0;
  for (; js + NR <= m; js += NR) stencil_grad_channels(g, d_tile, src, n, js, gs_local, 2);
  for (; js + VW <= m; js += VW) stencil_grad_channels(g, d_tile, src, n, js, gs_local, 1);
  for (; js < m; ++js)
    for (int t = 0; t < ntaps; ++t) {
      float acc = 0.f;
      for (int64_t i = 0; i < n; ++i) acc += d_tile[i * co + js] * src[t * TILE + i][js];
      gs_local[t * m + js] += acc;
    }
  /* the coupling, transposed: gq[c, j] += sum_i x[i, G cig + c] d[i, j], output channels in register blocks
     inside a group, input channels in balanced chunks of at most GRAD_ROWS(nv) */
  for (int64_t G = 0; G < g->groups; ++G) {
    const float *a = x_tile + G * cig;
    const int64_t end = (G + 1) * cog;
    for (int64_t j0 = G * cog; j0 < end;) {
      const int nv = j0 + NR <= end ? 2 : j0 + VW <= end ? 1 : 0;
      const int64_t rows = nv ? GRAD_ROWS(nv) : MR, chunks = (cig + rows - 1) / rows;
      for (int64_t chunk = 0, c0 = 0; chunk < chunks; ++chunk) { /* balanced: 16 = 8 + 8, not 12 + 4 */
        const int nc = (int)(cig / chunks + (chunk < cig % chunks));
        if (nv == 2) pointwise_grad_channels(g, d_tile, a, n, j0, c0, gq_local, nc, 2);
        else if (nv == 1) pointwise_grad_channels(g, d_tile, a, n, j0, c0, gq_local, nc, 1);
        else
          for (int u = 0; u < nc; ++u)
            for (int64_t j = j0; j < end; ++j) {
              float acc = 0.f;
              for (int64_t i = 0; i < n; ++i) acc += d_tile[i * co + j] * a[i * ci + c0 + u];
              gq_local[(c0 + u) * co + j] += acc;
            }
        c0 += nc;
      }
      j0 = nv ? j0 + nv * VW : end;
    }
  }
}

/* The output gradient given by batch norm's backward instead of stored (lean_backward with bg): d = a gm + e z + f
   per channel (coef: a, b, e, f, each (co)), with gm = g [mask] given the forward's mask bytes (the layout of g),
   gm = g where g is masked already, else g [a z + b > 0] (the ReLU mask recomputed from the operator's output z,
   as batch norm's kernel computes it). */
typedef struct {
  const float *g, *z, *coef;
  int masked;
  const int8_t *mask;
} bn_gradient;

/* d for the pixels [lo, hi) into window (pitch co). */
static void bn_gradient_window(const bn_gradient *bg, int64_t co, int64_t lo, int64_t hi, float *window) {
  const float *a = bg->coef, *b = a + co, *e = b + co, *f = e + co;
  for (int64_t q = lo; q < hi; ++q) {
    const float *g = bg->g + q * co, *z = bg->z + q * co;
    float *d = window + (q - lo) * co;
    int64_t j = 0;
    for (; j + VW <= co; j += VW) {
      const vec aj = vload(a + j), zj = vload(z + j), gj = vload(g + j);
      const vec gm = bg->mask ? keep_where_set(bg->mask + q * co + j, gj)
                     : bg->masked ? gj
                                  : (vec)((zj * aj + vload(b + j) > 0) & (__typeof__(zj > 0))gj);
      vstore(d + j, gm * aj + zj * vload(e + j) + vload(f + j));
    }
    for (; j < co; ++j) {
      const float gm = (bg->mask ? bg->mask[q * co + j] : bg->masked || z[j] * a[j] + b[j] > 0) ? g[j] : 0.f;
      d[j] = gm * a[j] + z[j] * e[j] + f[j];
    }
  }
}

/* The backward of y = P x + S x for the output gradient d (B, H, W, co), or, where d is NULL, for the one bg
   describes (zero boundary only): gp[j, c] = sum_p d[p, j] x[p, G(j) cig + c] (shape (co, cig), the layout of P),
   gs[j, t] = sum_p d[p, j] x_j(p + (dy_t, dx_t)) (shape (m, ntaps), the layout of s) and, unless dx is NULL, the
   input gradient dx = P^T d + S^T d (B, H, W, ci) plus, unless add is NULL, add's first ci channels (where its
   mask is set, if it has one): the forward's tile with the adjoint's geometry and weights (P^T, s on the flipped
   taps). Each tile computes its part of dx first, so that the weight gradients find d in cache. With bg each
   thread writes d into a window of its own for a run of consecutive tiles and the r rows and pixels around them
   (the adjoint's taps), then runs those tiles on it; a run spans at least four halos, so that at most a third of
   the window is computed again by the neighbouring run. Returns an error code (kernels.h). */
int lean_backward(const lean_shape *shape, const float *d, const bn_gradient *bg, const float *x, const float *p,
                  const float *s, float *dx, const addend *add, float *gp, float *gs) {
  geometry g, adj;
  if (!make_geometry(&g, shape, 0) || !make_geometry(&adj, shape, 1) || !d == !bg || (bg && g.circular)
      || (add && add->pitch < g.ci))
    return KERNEL_INVALID;
  const int nthreads = (int)shape->threads, ntaps = g.ntaps;
  const int64_t ci = g.ci, co = g.co, m = g.m, pixels = g.B * g.H * g.W, cig = g.cig, halo = (g.k / 2) * (g.W + 1);
  const int64_t run = bg && 4 * halo > TILE ? (4 * halo + TILE - 1) / TILE * TILE : TILE; /* pixels per window */
  const int64_t runs = (pixels + run - 1) / run;
  const size_t np = (size_t)(co * cig), ns = (size_t)(ntaps * m);
  float *wt = NULL, *pt = dx ? tile_weights(&g, p, s, 1, &wt) : NULL;
  channel_block *plan = dx ? plan_blocks(&adj) : NULL;
  /* per thread: the tap table, zeros, the weight gradients' sums and (with bg) the window of d */
  const size_t table = sizeof(float *) * (size_t)(ntaps > 0 ? ntaps : 1) * TILE;
  const size_t zeros = (size_t)((ci > co ? ci : co) + NR), windows = bg ? (size_t)((run + 2 * halo) * co + NR) : 0;
  size_t pitch;
  char *scratch = thread_scratch(nthreads, table + sizeof(float) * (zeros + (np + NR) + (ns + NR) + windows), &pitch);
  const int failed = !scratch || (dx && (!pt || !plan));
  const epilogue shortcut = {add ? *add : (addend){NULL, 0, NULL}, NULL, 0};
  if (!failed) {
    memset(gp, 0, np * sizeof(float));
    memset(gs, 0, ns * sizeof(float));
#pragma omp parallel num_threads(nthreads)
    {
      char *mine = scratch + (size_t)omp_get_thread_num() * pitch;
      const float **src = (const float **)mine;
      float *zero = (float *)(mine + table), *gq_local = zero + zeros, *gs_local = gq_local + np + NR;
      float *window = bg ? gs_local + ns + NR : NULL;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < runs; ++r) {
        const int64_t first = r * run, last = first + run < pixels ? first + run : pixels;
        const int64_t lo = bg ? (first > halo ? first - halo : 0) : 0;
        const int64_t hi = bg ? (last + halo < pixels ? last + halo : pixels) : pixels;
        if (bg) bn_gradient_window(bg, co, lo, hi, window);
        const float *dw = bg ? window : d;
        for (int64_t p0 = first; p0 < last; p0 += TILE) {
          const int64_t n = last - p0 < TILE ? last - p0 : TILE;
          if (dx) forward_tile(&adj, plan, dw, lo, hi, pt, wt, zero, src, p0, n, dx, &shortcut);
          weight_grad_tile(&g, dw + (p0 - lo) * co, x, zero, src, p0, n, gq_local, gs_local);
        }
      }
#pragma omp critical
      {
        for (int64_t j = 0; j < co; ++j) /* gq_local is (cig, co), gp (co, cig) */
          for (int64_t c = 0; c < cig; ++c) gp[j * cig + c] += gq_local[c * co + j];
        for (int64_t j = 0; j < m; ++j) /* gs_local is (ntaps, m): contiguous in j for the register blocks */
          for (int t = 0; t < ntaps; ++t) gs[j * ntaps + t] += gs_local[t * m + j];
      }
    }
  }
  free(scratch);
  free(plan);
  free(pt);
  return failed ? KERNEL_NO_MEMORY : KERNEL_OK;
}

/* The narrowest register block's channel width (VW), for the caller's choice of path: channel counts that are
   not a multiple of it leave a remainder for the scalar loops. */
int lean_block_channels(void) { return VW; }
