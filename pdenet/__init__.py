"""pdenet: convolutional networks written as discretized PDEs, built on lean convolution operators.

The public surface: time-stepping blocks and their stability analysis, networks and named configurations,
``leanify``, data sets and the training loop. The operators themselves live in the ``operators`` package.
"""
from .blocks import SCHEMES, TimeSteppingBlock, build_block
from .configs import build_model, describe, list_configs
from .fusion import FusionReport, fuse, unfuse
from .data import Augmentation, BatchLoader, Dataset, DatasetError, load_dataset
from .jacobian import jacobian_eigenvalues, perturbation_growth, step_spectra
from .leanify import LeanifyReport, leanify
from .networks import MobileNetV2, PDEResNet, ResNet, ShuffleNetV2, match_width
from .stability import report as stability_report

__version__ = "0.1.0"

__all__ = [
    "SCHEMES", "TimeSteppingBlock", "build_block",
    "build_model", "describe", "list_configs",
    "Augmentation", "BatchLoader", "Dataset", "DatasetError", "load_dataset",
    "jacobian_eigenvalues", "perturbation_growth", "step_spectra", "stability_report",
    "FusionReport", "fuse", "unfuse",
    "LeanifyReport", "leanify",
    "MobileNetV2", "PDEResNet", "ResNet", "ShuffleNetV2", "match_width",
]
