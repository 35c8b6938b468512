"""pdenet: convolutional networks written as discretized PDEs, built on lean convolution operators.

The public surface: time-stepping blocks and their stability analysis, networks and named configurations,
``leanify``, data sets and the training loop. The operators themselves live in the ``operators`` package;
``LeanConv2d``, its drop-in for ``nn.Conv2d``, is exported here too.

Extending: ``register_operator`` (an operator kind), ``register_scheme`` (a block with its stability contract),
``register_config`` (a named network) and ``register_dataset`` (a data set reader); ``pdenet COMMAND --import
MODULE`` imports a module of such registrations before the command runs.
"""
from operators import LeanConv2d, register_operator

from .blocks import SCHEMES, LayerBlock, StepStability, TimeSteppingBlock, build_block, register_scheme
from .configs import build_model, describe, list_configs, register_config
from .data import Augmentation, BatchLoader, Dataset, DatasetError, load_dataset, register_dataset
from .fusion import FusionReport, fuse, unfuse
from .jacobian import jacobian_eigenvalues, perturbation_growth, step_spectra
from .leanify import LeanifyReport, leanify
from .networks import MobileNetV2, PDEResNet, ResNet, ShuffleNetV2, match_width
from .stability import report as stability_report

__version__ = "0.1.0"

__all__ = [
    "SCHEMES", "LayerBlock", "StepStability", "TimeSteppingBlock", "build_block",
    "build_model", "describe", "list_configs",
    "Augmentation", "BatchLoader", "Dataset", "DatasetError", "load_dataset",
    "register_config", "register_dataset", "register_operator", "register_scheme",
    "jacobian_eigenvalues", "perturbation_growth", "step_spectra", "stability_report",
    "FusionReport", "fuse", "unfuse",
    "LeanConv2d", "LeanifyReport", "leanify",
    "MobileNetV2", "PDEResNet", "ResNet", "ShuffleNetV2", "match_width",
]
