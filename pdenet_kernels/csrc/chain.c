/* Inference of a chain of lean residual blocks with their batch norms folded, in one call: for each block
     x <- D x                         (stride 2: the mean of each 2 x 2 window, clipped at an odd edge)
     h  = ReLU(P1 x + S1 x + b1)
     x <- ReLU(P2 h + S2 h + b2 + Q x) (Q x: x with zero channels appended up to the block's width)
   each lean layer one lean_forward with its epilogue, the intermediate tensors in buffers allocated once per call.
   Layout channels-last float32 as lean.c; errors as kernels.h. */
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

/* One block (pdenet_kernels/binding.py mirrors this structure): its stride (1, or 2 for the pooling first),
   its input and output widths, the stencil rows of its first layer (min(in, out)), and the folded weights in
   PyTorch's layouts: P1 (out, in/groups), S1 (stencil_channels, ntaps), b1 (out), P2 (out, out/groups),
   S2 (out, ntaps), b2 (out). */
typedef struct {
  int64_t stride, in_channels, out_channels, stencil_channels;
  const float *p1, *s1, *b1, *p2, *s2, *b2;
} chain_block;

/* out (B, ceil(H/2), ceil(W/2), c) = the mean of each 2 x 2 window of x (B, H, W, c), clipped at an odd edge
   (PyTorch's avg_pool2d with kernel 2, stride 2 and ceil_mode) */
static void average_pool2(const float *x, int64_t B, int64_t H, int64_t W, int64_t c, int threads, float *out) {
  const int64_t Ho = (H + 1) / 2, Wo = (W + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t q = 0; q < B * Ho * Wo; ++q) {
    const int64_t b = q / (Ho * Wo), i = q / Wo % Ho, j = q % Wo;
    const int64_t h1 = 2 * i + 2 < H ? 2 * i + 2 : H, w1 = 2 * j + 2 < W ? 2 * j + 2 : W;
    const float scale = 1.f / (float)((h1 - 2 * i) * (w1 - 2 * j));
    float *o = out + q * c;
    for (int64_t ch = 0; ch < c; ++ch) o[ch] = 0.f;
    for (int64_t h = 2 * i; h < h1; ++h)
      for (int64_t w = 2 * j; w < w1; ++w) {
        const float *p = x + ((b * H + h) * W + w) * c;
        for (int64_t ch = 0; ch < c; ++ch) o[ch] += p[ch];
      }
    for (int64_t ch = 0; ch < c; ++ch) o[ch] *= scale;
  }
}

/* out (pixels, co) = x (pixels, ci) with zero channels appended */
static void pad_channels(const float *x, int64_t pixels, int64_t ci, int64_t co, int threads, float *out) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t q = 0; q < pixels; ++q) {
    memcpy(out + q * co, x + q * ci, sizeof(float) * (size_t)ci);
    memset(out + q * co + ci, 0, sizeof(float) * (size_t)(co - ci));
  }
}

/* y = the chain of `count` blocks applied to x; `shape` gives x's batch, height, width and channels, the taps,
   kernel size, groups, boundary and threads shared by every layer (its out_channels and stencil_channels are not
   read). y is (batch, H', W', the last block's out_channels) with H', W' halved (rounding up) at each stride 2.
   Returns an error code (kernels.h); KERNEL_INVALID where a block does not take the previous one's output. */
int lean_chain_forward(const lean_shape *shape, int64_t count, const chain_block *blocks, const float *x, float *y) {
  const int threads = (int)shape->threads;
  int64_t H = shape->height, W = shape->width, c = shape->in_channels, largest = 0;
  if (count < 1 || shape->batch < 0) return KERNEL_INVALID;
  for (int64_t i = 0; i < count; ++i) { /* the widths must follow on; the largest tensor sizes the buffers */
    const chain_block *b = blocks + i;
    if (b->in_channels != c || b->out_channels < c || (b->stride != 1 && b->stride != 2)
        || b->stencil_channels > c || b->stencil_channels > b->out_channels)
      return KERNEL_INVALID;
    if (b->stride == 2) H = (H + 1) / 2, W = (W + 1) / 2;
    c = b->out_channels;
    const int64_t size = H * W * c;
    if (size > largest) largest = size;
  }
  largest *= shape->batch;
  /* the block's input (pooled), h, the padded shortcut, and two outputs taking turns */
  float *buffer = kernel_malloc(sizeof(float) * (size_t)(5 * largest + 1));
  if (!buffer) return KERNEL_NO_MEMORY;
  float *pooled = buffer, *h = buffer + largest, *padded = buffer + 2 * largest;
  float *outputs[2] = {buffer + 3 * largest, buffer + 4 * largest};
  const float *in = x;
  int code = KERNEL_OK;
  H = shape->height, W = shape->width;
  for (int64_t i = 0; i < count && code == KERNEL_OK; ++i) {
    const chain_block *b = blocks + i;
    const int64_t ci = b->in_channels, co = b->out_channels;
    if (b->stride == 2) {
      average_pool2(in, shape->batch, H, W, ci, threads, pooled);
      H = (H + 1) / 2, W = (W + 1) / 2;
      in = pooled;
    }
    const int64_t pixels = shape->batch * H * W;
    lean_shape layer = *shape;
    layer.height = H, layer.width = W, layer.in_channels = ci, layer.out_channels = co;
    layer.stencil_channels = b->stencil_channels;
    const epilogue first = {{NULL, 0, NULL}, b->b1, 1};
    code = lean_forward(&layer, in, b->p1, b->s1, &first, h, NULL, NULL);
    if (code != KERNEL_OK) break;
    const float *shortcut = in;
    if (co > ci) {
      pad_channels(in, pixels, ci, co, threads, padded);
      shortcut = padded;
    }
    layer.in_channels = co, layer.stencil_channels = co;
    const epilogue second = {{shortcut, co, NULL}, b->b2, 1};
    float *out = i + 1 == count ? y : outputs[i % 2];
    code = lean_forward(&layer, h, b->p2, b->s2, &second, out, NULL, NULL);
    in = out;
  }
  free(buffer);
  return code;
}
