"""The operator cases every parametrized operator test runs over (one entry per kind and option set)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from operators import make_operator

# (kind, keywords, channel multiple, square only, weights(c_in, c_out, k) as in DESIGN.md's table)
KINDS = [
    ("dense", {}, 1, False, lambda ci, co, k: k * k * ci * co),
    ("lean", {"stencil": "cross"}, 1, False, lambda ci, co, k: ci * co + 5 * min(ci, co)),
    ("lean", {"stencil": "full", "groups": 2}, 2, False, lambda ci, co, k: ci * co // 2 + k * k * min(ci, co)),
    ("lean", {"stencil": "none"}, 1, False, lambda ci, co, k: ci * co),
    ("grouped", {"groups": 2}, 2, False, lambda ci, co, k: k * k * ci * co // 2),
    ("grouped", {"groups": 3, "shuffle": True}, 3, False, lambda ci, co, k: k * k * ci * co // 3),
    ("separable", {}, 1, False, lambda ci, co, k: ci * co + k * k * ci),
    ("depthwise", {}, 1, True, lambda ci, co, k: k * k * ci),
    ("pointwise", {}, 1, False, lambda ci, co, k: ci * co),
    ("circulant", {"method": "direct"}, 1, True, lambda ci, co, k: k * k * ci),
    ("circulant", {"method": "fft"}, 1, True, lambda ci, co, k: k * k * ci),
]
BOUNDARIES = ["zeros", "circular"]


def case_id(case) -> str:
    kind, kw = case[0], case[1]
    return kind + "".join(f"-{k}={v}" for k, v in kw.items())


CASES = [pytest.param(case, id=case_id(case)) for case in KINDS]


def channels(case, seed: int) -> tuple[int, int]:
    """Random channel counts for the case (``c_in ≠ c_out`` where the kind allows it)."""
    _, _, multiple, square, _ = case
    rng = np.random.default_rng(seed)
    c_in = multiple * int(rng.integers(1, 3))
    if square:
        return c_in, c_in
    c_out = c_in
    while c_out == c_in:
        c_out = multiple * int(rng.integers(1, 4))
    return c_in, c_out


def build(case, boundary="circular", seed=0, dtype=torch.float64, c_in=None, c_out=None):
    """The case's operator with seeded random weights, in ``dtype``."""
    kind, kw = case[0], case[1]
    if c_in is None:
        c_in, c_out = channels(case, seed)
    torch.manual_seed(seed)
    return make_operator(kind, c_in, c_out, boundary=boundary, **kw).to(dtype)
