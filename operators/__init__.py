"""Linear convolution operators with exact adjoints, Fourier symbols, spectra and step bounds."""
from .base import ConvOperator
from .circulant import CirculantConv
from .conv2d import LeanConv2d
from .dense import DenseConv
from .depthwise import DepthwiseConv
from .dottest import dottest
from .flops import count_flops
from .grouped import GroupedConv, channel_shuffle
from .lean import LeanConv
from .pointwise import PointwiseConv
from .registry import OPERATORS, make_operator, register_operator
from .separable import SeparableConv

__all__ = [
    "ConvOperator", "DenseConv", "LeanConv", "LeanConv2d", "GroupedConv", "SeparableConv", "DepthwiseConv",
    "PointwiseConv", "CirculantConv", "OPERATORS", "make_operator", "register_operator", "count_flops", "dottest",
    "channel_shuffle",
]
