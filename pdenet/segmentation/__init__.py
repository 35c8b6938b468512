"""Semantic segmentation with lean networks: metrics, the encoder–decoder network, the training task and
colour-coded predictions (CamVid)."""
from .metrics import class_iou, confusion_matrix, mean_iou, pixel_accuracy
from .network import SegmentationNet
from .task import SegmentationTask, resolve_class_weights
from .visualize import colorize, save_prediction_grid

__all__ = ["SegmentationNet", "SegmentationTask", "class_iou", "colorize", "confusion_matrix",
           "mean_iou", "pixel_accuracy", "resolve_class_weights", "save_prediction_grid"]
