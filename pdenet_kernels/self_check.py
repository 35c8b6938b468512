"""The compiled kernels against numpy references on small problems, before their first use.

Numpy, not torch: the check may run inside a user's FLOP counter, inference mode or a compiler's tracing, none of
which must see it. ``self_check(lib)`` returns the first mismatch as text, or ``""``.
"""
from __future__ import annotations

import ctypes

import numpy as np

from .binding import (KERNEL_OK, MASK_APPLIED, MASK_BYTES, MASK_FROM_OUTPUT, Addend, BnGradient, BnLayer, ChainBlock,
                      Epilogue, LeanShape)


def _shifted(x: np.ndarray, dy: int, dx: int, circular: bool) -> np.ndarray:
    """``x(n + (dy, dx))`` for ``x`` of shape (B, H, W, c): periodic, or zero outside the grid."""
    if circular:
        return np.roll(x, (-dy, -dx), axis=(1, 2))
    _, h, w, _ = x.shape
    out = np.zeros_like(x)
    out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        x[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


def _lean(lib) -> str:
    """Forward and backward lean kernels: odd sizes, channel mismatch, groups, both boundaries, the forward's
    epilogue (a residual of a wider pitch, a bias, the ReLU), the batch-norm output gradient in its three mask modes
    with a shortcut's masked gradient added."""
    nr = lib.lean_block_channels()
    rng = np.random.default_rng(0)
    taps = np.array([1, 3, 4, 5, 7], dtype=np.int64)  # the 3x3 cross
    for c_in, c_out, groups, circular in [(5, 7, 1, True), (nr + 3, nr + 1, 1, False), (2 * nr, 2 * nr, 2, True),
                                          (3 * nr + 1, 3 * nr + 1, 1, False), (3, 2, 1, False)]:
        m, cig, cog = min(c_in, c_out), c_in // groups, c_out // groups
        x = rng.standard_normal((2, 5, 7, c_in), dtype=np.float32)
        d = rng.standard_normal((2, 5, 7, c_out), dtype=np.float32)
        p = rng.standard_normal((c_out, cig), dtype=np.float32)  # P and s in PyTorch's layouts
        s = rng.standard_normal((m, len(taps)), dtype=np.float32)
        shift = rng.standard_normal(c_out, dtype=np.float32)
        shifted = [_shifted(x[..., :m], t // 3 - 1, t % 3 - 1, circular) for t in taps]
        rows = [(slice(G * cig, (G + 1) * cig), slice(G * cog, (G + 1) * cog)) for G in range(groups)]

        def input_grad(dd):  # P^T dd + S^T dd
            out = np.concatenate([dd[..., o] @ p[o] for _, o in rows], -1)
            out[..., :m] += sum(w * _shifted(dd[..., :m], 1 - t // 3, 1 - t % 3, circular) for w, t in zip(s.T, taps))
            return out

        def pointwise_grad(dd):
            return np.concatenate([np.einsum("bhwj,bhwc->jc", dd[..., o], x[..., i]) for i, o in rows])

        def stencil_grad(dd):
            return np.stack([np.einsum("bhwj,bhwj->j", dd[..., :m], sx) for sx in shifted], 1)

        ref = np.concatenate([x[..., i] @ p[o].T for i, o in rows], -1)
        ref[..., :m] += sum(w * sx for w, sx in zip(s.T, shifted))
        residual = rng.standard_normal((2, 5, 7, c_out + 1), dtype=np.float32)
        bias = rng.standard_normal(c_out, dtype=np.float32)
        expected = {"forward": ref, "forward with its epilogue": np.maximum(ref + residual[..., :c_out] + bias, 0),
                    "input gradient": input_grad(d), "pointwise gradient": pointwise_grad(d),
                    "stencil gradient": stencil_grad(d),
                    "output moments": np.stack([(ref - shift).sum((0, 1, 2)), ((ref - shift) ** 2).sum((0, 1, 2))])}
        got = {"forward": np.empty_like(d), "forward with its epilogue": np.empty_like(d), "input gradient": np.empty_like(x), "pointwise gradient": np.empty_like(p),
               "stencil gradient": np.empty_like(s), "output moments": np.empty((2, c_out))}
        shape = ctypes.byref(LeanShape(2, 5, 7, c_in, c_out, m, 3, groups, int(circular), 1, len(taps),
                                       taps.ctypes.data))
        weights = (x.ctypes.data, p.ctypes.data, s.ctypes.data)
        epilogue = Epilogue(residual.ctypes.data, c_out + 1, None, bias.ctypes.data, 1)
        codes = [lib.lean_forward(shape, *weights, None, got["forward"].ctypes.data, shift.ctypes.data,
                                  got["output moments"].ctypes.data),
                 lib.lean_forward(shape, *weights, ctypes.byref(epilogue), got["forward with its epilogue"].ctypes.data,
                                  None, None)]
        grads = [got[k].ctypes.data for k in ("input gradient", "pointwise gradient", "stencil gradient")]
        codes.append(lib.lean_backward(shape, d.ctypes.data, None, *weights, grads[0], None, *grads[1:]))
        if not circular:  # the output gradient of batch norm's backward, a gm + e z + f, from (d, z = forward)
            coef, mode, z = rng.standard_normal((4, c_out), dtype=np.float32), c_in % 3, got["forward"]
            relu_mask = np.where(rng.random(d.shape) < 0.5, -1, 0).astype(np.int8)
            keep = {MASK_FROM_OUTPUT: z * coef[0] + coef[1] > 0, MASK_APPLIED: True, MASK_BYTES: relu_mask != 0}[mode]
            d_bn = d * keep * coef[0] + z * coef[2] + coef[3]
            addend = rng.standard_normal((2, 5, 7, c_in + 2), dtype=np.float32)  # and a shortcut's masked gradient
            addend_mask = np.where(rng.random(addend.shape) < 0.5, -1, 0).astype(np.int8)
            expected["batch-norm input gradient"] = input_grad(d_bn) + (addend * (addend_mask != 0))[..., :c_in]
            expected["batch-norm pointwise gradient"] = pointwise_grad(d_bn)
            expected["batch-norm stencil gradient"] = stencil_grad(d_bn)
            names = ("batch-norm input gradient", "batch-norm pointwise gradient", "batch-norm stencil gradient")
            got.update({name: np.empty_like(like) for name, like in zip(names, (x, p, s))})
            grads = [got[name].ctypes.data for name in names]
            bn = BnGradient(d.ctypes.data, z.ctypes.data, coef.ctypes.data, int(mode == MASK_APPLIED),
                            relu_mask.ctypes.data if mode == MASK_BYTES else None)
            add = Addend(addend.ctypes.data, c_in + 2, addend_mask.ctypes.data)
            codes.append(lib.lean_backward(shape, None, ctypes.byref(bn), *weights, grads[0], ctypes.byref(add),
                                           *grads[1:]))
        if any(code != KERNEL_OK for code in codes):
            return f"the lean kernels refused c_in={c_in}, c_out={c_out}, groups={groups} (codes {codes})"
        for name, want in expected.items():
            if not np.allclose(got[name], want, rtol=1e-4, atol=1e-3 if name.startswith("batch-norm") else 1e-4):
                return f"lean {name} differs from numpy for c_in={c_in}, c_out={c_out}, groups={groups}"
    return ""


def _chain(lib) -> str:
    """A chain of two folded residual blocks (3 -> 3 channels, then stride 2 and 3 -> 5 on an odd grid) against
    the lean forward with its epilogue (checked above) and numpy's pooling and channel padding."""
    rng = np.random.default_rng(1)
    taps = np.array([1, 3, 4, 5, 7], dtype=np.int64)
    x = rng.standard_normal((2, 5, 7, 3), dtype=np.float32)
    blocks, weights = [], []
    for stride, ci, co in ((1, 3, 3), (2, 3, 5)):
        w = [rng.standard_normal(shape, dtype=np.float32) for shape in
             ((co, ci), (min(ci, co), 5), (co,), (co, co), (co, 5), (co,))]
        weights.append(w)
        blocks.append(ChainBlock(stride, ci, co, min(ci, co), *(a.ctypes.data for a in w)))

    def layer(inp, co, m, p, s, bias, residual=None):
        out = np.empty(inp.shape[:3] + (co,), np.float32)
        shape = LeanShape(*inp.shape[:3], inp.shape[3], co, m, 3, 1, 0, 1, 5, taps.ctypes.data)
        ep = Epilogue(None if residual is None else residual.ctypes.data, co, None, bias.ctypes.data, 1)
        code = lib.lean_forward(ctypes.byref(shape), inp.ctypes.data, p.ctypes.data, s.ctypes.data, ctypes.byref(ep),
                                out.ctypes.data, None, None)
        return out if code == KERNEL_OK else None

    expected = x
    for (stride, ci, co), (p1, s1, b1, p2, s2, b2) in zip(((1, 3, 3), (2, 3, 5)), weights):
        if stride == 2:  # 2 x 2 means, the last row and column alone on the odd 5 x 7 grid
            padded = np.pad(expected, ((0, 0), (0, 1), (0, 1), (0, 0)))
            counts = np.pad(np.ones(expected.shape[1:3]), ((0, 1), (0, 1)))
            sums = padded.reshape(2, 3, 2, 4, 2, ci).sum((2, 4))
            expected = (sums / counts.reshape(3, 2, 4, 2).sum((1, 3))[None, :, :, None]).astype(np.float32)
        h = layer(expected, co, min(ci, co), p1, s1, b1)
        shortcut = np.ascontiguousarray(np.pad(expected, ((0, 0), (0, 0), (0, 0), (0, co - ci))))
        expected = None if h is None else layer(h, co, co, p2, s2, b2, shortcut)
        if expected is None:
            return "the lean forward refused a chain block's layer"
    got = np.empty((2, 3, 4, 5), np.float32)
    shape = LeanShape(2, 5, 7, 3, 0, 0, 3, 1, 0, 2, 5, taps.ctypes.data)
    code = lib.lean_chain_forward(ctypes.byref(shape), 2, (ChainBlock * 2)(*blocks), x.ctypes.data, got.ctypes.data)
    if code != KERNEL_OK:
        return f"the chain kernel refused two small blocks (code {code})"
    if not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
        return "the chain of residual blocks differs from its layers"
    return ""


def _batch_norm_reference(x, r, gamma, beta, eps, g):
    """numpy in float64: ``y = max(0, γ x̂ + β + r)`` over (P, C) and its gradients ``(y, dx, gm, dγ, dβ)``."""
    mean, var = x.mean(0), x.var(0)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = np.maximum(gamma * xhat + beta + r, 0)
    gm = g * (y > 0)
    dbeta, dgamma = gm.sum(0), (gm * xhat).sum(0)
    dx = gamma / np.sqrt(var + eps) * (gm - dbeta / len(x) - xhat * dgamma / len(x))
    return y, dx, gm, dgamma, dbeta


def _batch_norm(lib) -> str:
    """Batch norm + ReLU kernels on a small problem (odd channel count, with and without a residual, running
    statistics, the moments summed here or given, the mask bytes out and back in)."""
    rng = np.random.default_rng(0)
    P, C, eps, momentum = 70, 19, 1e-5, 0.1
    x = (rng.standard_normal((P, C)) * 3 + 5).astype(np.float32)
    g, residual = rng.standard_normal((P, C), dtype=np.float32), rng.standard_normal((P, C), dtype=np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.uniform(-1, 1, C).astype(np.float32)
    ptr = (lambda a: None if a is None else a.ctypes.data)
    for r in (None, residual):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        y, mean, invstd = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
        dx, dr, dgamma, dbeta = np.empty_like(x), np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
        shift = None if r is None else np.full(C, 4.0, np.float32)  # with the residual: moments given
        given = None if r is None else np.stack([(x - shift).sum(0, dtype=np.float64),
                                                 ((x - shift).astype(np.float64) ** 2).sum(0)])
        mask = np.empty((P, C), np.int8)
        layer = ctypes.byref(BnLayer(P, C, 2, ptr(gamma), ptr(beta), ptr(rm), ptr(rv), momentum, eps))
        coef = np.empty((4, C), np.float32)
        dgamma_from_mask, dbeta_from_mask = np.empty(C, np.float32), np.empty(C, np.float32)
        codes = [lib.bn_relu_forward(layer, ptr(x), ptr(r), ptr(given), ptr(shift), ptr(y), ptr(mask), ptr(mean),
                                     ptr(invstd)),
                 lib.bn_relu_backward(layer, ptr(g), ptr(x), None if r is None else ptr(y), ptr(mean), ptr(invstd),
                                      None if r is None else ptr(dr), ptr(dx), ptr(dgamma), ptr(dbeta)),
                 lib.bn_relu_backward_coefficients(layer, ptr(g), ptr(x), None, ptr(mask), ptr(mean), ptr(invstd),
                                                   None, ptr(coef), ptr(dgamma_from_mask), ptr(dbeta_from_mask))]
        if any(code != KERNEL_OK for code in codes):
            return f"the batch-norm kernels refused a small problem (codes {codes})"
        ref = _batch_norm_reference(x.astype(np.float64), 0 if r is None else r, gamma, beta, eps, g)
        checks = [("output", y, ref[0]), ("mask bytes", mask, np.where(ref[0] > 0, -1, 0)),
                  ("weight gradient from the mask bytes", dgamma_from_mask, ref[3]),
                  ("bias gradient from the mask bytes", dbeta_from_mask, ref[4]),
                  ("input gradient", dx, ref[1]), ("weight gradient", dgamma, ref[3]),
                  ("bias gradient", dbeta, ref[4]), ("running mean", rm, momentum * x.mean(0)),
                  ("running variance", rv, 1 - momentum + momentum * x.astype(np.float64).var(0, ddof=1))]
        if r is not None:
            checks.append(("residual gradient", dr, ref[2]))
        for name, a, b in checks:
            if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
                return f"batch-norm {name} differs from numpy ({'with' if r is not None else 'without'} a residual)"
    return ""


def self_check(lib) -> str:
    """Every kernel of ``lib`` against numpy; the first mismatch as text, or ``""``."""
    return _lean(lib) or _chain(lib) or _batch_norm(lib)
