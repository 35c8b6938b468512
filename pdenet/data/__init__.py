"""Real data sets read from disk (Fashion-MNIST, CIFAR-10/100, CamVid), batch augmentation and a
deterministic, shardable batch loader. Nothing is downloaded at run time."""
from .augment import AugmentParams, Augmentation, color_jitter, crop, normalize, zoom
from .camvid import load_camvid
from .cifar import load_cifar10, load_cifar100
from .dataset import Dataset, DatasetError
from .fashion_mnist import load_fashion_mnist
from .idx import read_idx
from .loader import BatchLoader
from .registry import DATASETS, load_dataset, register_dataset
from .stats import channel_stats, median_frequency_weights

__all__ = ["AugmentParams", "Augmentation", "BatchLoader", "DATASETS", "Dataset", "DatasetError", "channel_stats",
           "color_jitter", "crop", "load_camvid", "load_cifar10", "load_cifar100", "load_dataset",
           "load_fashion_mnist", "median_frequency_weights", "normalize", "read_idx", "register_dataset", "zoom"]
