"""Segmentation metrics from a confusion matrix: per-class IoU, mean IoU and pixel accuracy.

Notes
-----
With ``C[t, p]`` the number of labelled pixels of true class ``t`` predicted as ``p`` (pixels whose ground
truth is the void label are dropped before counting, whatever was predicted there)::

    IoU_c = C[c, c] / (Σ_p C[c, p] + Σ_t C[t, c] − C[c, c])       (TP / (TP + FN + FP))
    pixel accuracy = Σ_c C[c, c] / Σ_{t, p} C[t, p]

Convention for absent classes: a class that appears neither in the ground truth nor in the prediction
(``TP + FN + FP = 0``) has an undefined IoU, reported as ``nan`` and left out of the mean; the mean IoU is
taken over the classes present in prediction ∪ ground truth. A class predicted but absent from the ground
truth has IoU 0 and counts. Metrics over a data set are computed from the confusion matrix summed over all
images (the usual CamVid/SegNet protocol), not averaged per image.
"""
from __future__ import annotations

import math

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 11) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts ``C[true, predicted]`` over the non-void pixels.

    ``pred`` holds class ids (any integer shape) or logits ``(B, num_classes, H, W)``, whose arg-max over
    dim 1 is taken; ``target`` holds class ids in ``[0, num_classes)`` or ``ignore_index``.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("confusion_matrix expects torch tensors for pred and target")
    if pred.is_floating_point():
        if pred.dim() != target.dim() + 1 or pred.shape[1] != num_classes:
            raise ValueError(f"logits must be (B, {num_classes}, H, W) for targets (B, H, W); "
                             f"got logits {tuple(pred.shape)} and targets {tuple(target.shape)}")
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    pred, target = pred[keep], target[keep]
    for name, t in (("target", target), ("prediction", pred)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} class ids must lie in [0, {num_classes}) (ignore index {ignore_index}); "
                             f"found values in [{int(t.min())}, {int(t.max())}]")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``TP / (TP + FP + FN)`` (float64); ``nan`` for classes absent from both maps."""
    c = confusion.to(torch.float64)
    tp = c.diagonal()
    union = c.sum(0) + c.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean of :func:`class_iou` over the classes present in prediction ∪ ground truth (``nan`` if none)."""
    iou = class_iou(confusion)
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else math.nan


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Fraction of non-void pixels labelled correctly (``nan`` if there are none)."""
    total = int(confusion.sum())
    return int(confusion.diagonal().sum()) / total if total else math.nan
