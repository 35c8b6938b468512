"""Bad input raises ValueError/TypeError whose message names the problem."""
from __future__ import annotations

import pytest
import torch

from cases import CASES, build
from operators import (CirculantConv, DenseConv, DepthwiseConv, GroupedConv, LeanConv, PointwiseConv, count_flops,
                       make_operator)


@pytest.mark.parametrize("case", CASES)
def test_channel_mismatch(case):
    op = build(case, seed=0)
    with pytest.raises(ValueError, match=f"expects {op.in_channels} channels, got {op.in_channels + 1}"):
        op(torch.zeros(1, op.in_channels + 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"expects {op.out_channels} channels"):
        op.adjoint(torch.zeros(1, op.out_channels + 1, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("case", CASES)
def test_three_dimensional_input(case):
    op = build(case, seed=0)
    with pytest.raises(ValueError, match="4-D tensor"):
        op(torch.zeros(op.in_channels, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        op.adjoint([[1.0]])


@pytest.mark.parametrize("case", CASES)
def test_unknown_boundary(case):
    with pytest.raises(ValueError, match="unknown boundary condition 'reflect'"):
        make_operator(case[0], 6, 6, boundary="reflect", **case[1])


@pytest.mark.parametrize("cls,kw", [(GroupedConv, {}), (LeanConv, {})])
def test_groups_must_divide_channels(cls, kw):
    with pytest.raises(ValueError, match="groups=4 must divide in_channels=6"):
        cls(6, 8, groups=4, **kw)
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        cls(6, 6, groups=0, **kw)


def test_unknown_stencil():
    with pytest.raises(ValueError, match="unknown stencil 'star'"):
        LeanConv(4, 4, stencil="star")


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown operator kind 'sparse'.*'dense'.*'circulant'"):
        make_operator("sparse", 4, 4)
    with pytest.raises(ValueError, match=r"'grouped' operator takes no option\(s\) stencil; it takes: kernel_size"):
        make_operator("grouped", 4, 4, stencil="cross")


@pytest.mark.parametrize("cls", [DepthwiseConv, CirculantConv])
def test_square_only_kinds(cls):
    with pytest.raises(ValueError, match="needs in_channels == out_channels, got 4 and 6"):
        cls(4, 6)


def test_kind_specific_options():
    with pytest.raises(ValueError, match="kernel_size must be 1"):
        PointwiseConv(4, 4, kernel_size=3)
    with pytest.raises(ValueError, match="unknown CirculantConv method 'dft'"):
        CirculantConv(4, 4, method="dft")
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        GroupedConv(4, 4, groups=2, shuffle="yes")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DenseConv(4, 4, kernel_size=4)
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        DenseConv(0, 4)


def test_spectral_arguments():
    op = DenseConv(2, 2)
    with pytest.raises(ValueError, match="unknown spectral_norm method 'svd'"):
        op.spectral_norm((4, 4), method="svd")
    with pytest.raises(ValueError, match="needs a grid"):
        op.spectral_norm(method="power")
    with pytest.raises(TypeError, match="grid must be an int or a pair"):
        op.singular_values("8x8")
    with pytest.raises(ValueError, match="grid sizes must be positive"):
        op.symbol((0, 4))


def test_count_flops_needs_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module, got function"):
        count_flops(lambda x: x, torch.zeros(1))
