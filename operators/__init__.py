"""Linear convolution operators with exact adjoints, Fourier symbols, spectra and step bounds."""
from .base import ConvOperator
from .dense import DenseConv
from .dottest import dottest

__all__ = ["ConvOperator", "DenseConv", "dottest"]
