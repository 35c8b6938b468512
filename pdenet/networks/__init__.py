"""Networks: PDE-ResNets, (lean) ResNets, and the MobileNetV2 and ShuffleNetV2 baselines."""
from .mobilenetv2 import MobileNetV2
from .pde_resnet import PDEResNet
from .resnet import ResNet, cifar_resnet, resnet18, resnet20, resnet32, resnet34, resnet56
from .shufflenetv2 import ShuffleNetV2
from .width import make_divisible, match_width

__all__ = [
    "MobileNetV2", "PDEResNet", "ResNet", "ShuffleNetV2", "cifar_resnet", "make_divisible", "match_width",
    "resnet18", "resnet20", "resnet32", "resnet34", "resnet56",
]
