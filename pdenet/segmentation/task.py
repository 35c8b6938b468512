"""The segmentation task for :class:`pdenet.training.Trainer`: per-pixel cross-entropy, mIoU and pixel accuracy.

Loss, for logits ``f`` of shape ``(B, K, H, W)``, targets ``y`` of shape ``(B, H, W)`` and class weights ``w``
(all ones without weighting), over the pixels ``p`` whose label is not the ignore index::

    L = Σ_p w_{y_p} (−log softmax(f_p)_{y_p}) / Σ_p w_{y_p}

(PyTorch's weighted mean; a batch without any labelled pixel has loss 0). Metrics come from the confusion
matrix summed over the evaluated images (:mod:`pdenet.segmentation.metrics`): mean IoU over the classes
present in prediction ∪ ground truth, pixel accuracy and the IoU of each class.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..training import Task
from .metrics import class_iou, confusion_matrix, mean_iou, pixel_accuracy

#: ``--class-weights`` choices besides an explicit comma-separated list of ``num_classes`` numbers.
CLASS_WEIGHTINGS = ("none", "segnet-median-freq", "median-freq")
#: file the task writes after training: predictions next to the ground truth for the first images.
PREDICTIONS_PNG = "predictions.png"


def resolve_class_weights(spec, dataset) -> torch.Tensor | None:
    """Class weights ``(num_classes,)`` float32 for ``spec`` on training set ``dataset``, or ``None``.

    ``spec``: ``None``/``"none"``; ``"segnet-median-freq"``, the published SegNet weights the data set
    carries (CamVid); ``"median-freq"``, median-frequency balancing computed from ``dataset``'s masks;
    a sequence of numbers or a comma-separated string of them, one per class.
    """
    if spec is None or spec == "none":
        return None
    k = dataset.num_classes
    if spec == "segnet-median-freq":
        if dataset.class_weights is None:
            raise ValueError(f"data set {dataset.name!r} has no published SegNet median-frequency weights; "
                             f"use --class-weights median-freq to compute them from its masks")
        weights = torch.tensor(dataset.class_weights, dtype=torch.float64)
    elif spec == "median-freq":
        from ..data import median_frequency_weights

        weights = median_frequency_weights(dataset.targets, k, dataset.ignore_index)
    else:
        try:
            values = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        except (TypeError, ValueError):
            raise ValueError(f"class weights {spec!r} are neither one of {CLASS_WEIGHTINGS} nor a list of "
                             f"{k} numbers") from None
        weights = torch.tensor(values, dtype=torch.float64)
    if weights.shape != (k,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) \
            or not float(weights.sum()) > 0:
        raise ValueError(f"class weights must be {k} finite non-negative numbers, not all zero; got "
                         f"{weights.tolist()}")
    return weights.float()


class SegmentationTask(Task):
    """Per-pixel (optionally class-weighted) cross-entropy ignoring ``ignore_index``; headline metric mIoU.

    State (float64 sums): ``[Σ loss · B, B, C.flatten()]`` with ``C`` the ``K x K`` confusion matrix
    ``C[true, predicted]``. Outputs ``(B, K, H, W)`` logits, targets ``(B, H, W)`` class ids. ``summarize``
    gives ``loss``, ``miou``, ``pixel_accuracy`` and ``iou_<class>`` for the classes present in prediction
    ∪ ground truth (absent classes have no IoU and no key).
    """

    name = "segmentation"
    metric = "miou"
    metric_label = "test mIoU"

    def __init__(self, num_classes: int, ignore_index: int | None = 11, class_weights=None,
                 class_names=None, palette=None, mean=None, std=None, num_visualized: int = 4):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if self.class_weights is not None and self.class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have {num_classes} entries, got shape "
                             f"{tuple(self.class_weights.shape)}")
        self.class_names = tuple(class_names) if class_names is not None else tuple(map(str, range(num_classes)))
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.palette = palette
        self.mean, self.std = mean, std
        self.num_visualized = num_visualized

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--class-weights", default=argparse.SUPPRESS, metavar="WEIGHTS",
                            help="segmentation loss weights per class: none (default), segnet-median-freq "
                                 "(SegNet's published CamVid weights), median-freq (computed from the training "
                                 "masks) or a comma-separated list")

    @classmethod
    def from_dataset(cls, dataset, options: dict) -> "SegmentationTask":
        if dataset.task != "segmentation":
            raise ValueError(f"data set {dataset.name!r} has {dataset.task} targets, not masks; "
                             f"use --task {dataset.task}")
        return cls(dataset.num_classes, dataset.ignore_index,
                   resolve_class_weights(options.get("class_weights"), dataset), dataset.class_names,
                   dataset.palette, dataset.mean, dataset.std)

    # ------------------------------------------------------------------------- loss and metrics
    def _check(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.dim() != 4 or output.shape[1] != self.num_classes or target.dim() != 3 \
                or output.shape[0] != target.shape[0] or output.shape[2:] != target.shape[1:]:
            raise ValueError(f"segmentation expects logits (B, {self.num_classes}, H, W) and masks (B, H, W) of the "
                             f"same size; got {tuple(output.shape)} and {tuple(target.shape)}")

    def loss(self, output, target):
        self._check(output, target)
        weight = None if self.class_weights is None else self.class_weights.to(output.device)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        total = F.cross_entropy(output.float(), target, weight=weight, ignore_index=ignore, reduction="sum")
        labelled = target[target != ignore]
        norm = output.new_tensor(float(labelled.numel())) if weight is None else weight[labelled].sum()
        return total / norm.clamp_min(1e-12)

    def state_size(self):
        return 2 + self.num_classes ** 2

    def update(self, state, output, target, loss):
        self._check(output, target)
        b = target.shape[0]
        state[0] += loss.detach().double() * b
        state[1] += b
        state[2:] += confusion_matrix(output.detach(), target, self.num_classes, self.ignore_index).flatten()

    def summarize(self, state):
        k = self.num_classes
        confusion = state[2:].reshape(k, k).cpu()
        n = max(float(state[1]), 1.0)
        iou = class_iou(confusion)
        return {"loss": float(state[0]) / n, "miou": mean_iou(confusion), "pixel_accuracy": pixel_accuracy(confusion),
                **{f"iou_{name}": v for name, v in zip(self.class_names, iou.tolist()) if not math.isnan(v)}}

    # ------------------------------------------------------------------------- artifacts
    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
        """Class ids ``(N, H, W)`` for uint8 images ``(N, C, H, W)``, normalized as in training, in eval mode."""
        from ..data import normalize

        if self.mean is None or self.std is None:
            raise ValueError("predict needs the data set's mean and std (build the task with from_dataset)")
        p = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            parts = [model(normalize(images[i:i + batch_size].to(p.device), self.mean, self.std, p.dtype)).argmax(1)
                     for i in range(0, images.shape[0], batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(parts).cpu()

    def save_artifacts(self, model, dataset, out) -> list[str]:
        """``predictions.png``: image, ground truth and prediction for the first ``num_visualized`` images
        (in the data set's palette, CamVid's when it has none)."""
        from .visualize import PALETTE, save_prediction_grid

        n = min(self.num_visualized, len(dataset))
        if n == 0:
            return []
        images, targets = dataset.images[:n], dataset.targets[:n]
        save_prediction_grid(images, targets, self.predict(model, images), Path(out) / PREDICTIONS_PNG,
                             self.class_names, PALETTE if self.palette is None else self.palette, self.ignore_index)
        return [PREDICTIONS_PNG]
