"""Semantic segmentation: metrics on hand-made masks, the network's shapes and costs, the task's loss and
metrics, colour-coded predictions, and ``pdenet train --task segmentation`` end to end on generated CamVid."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pdenet import checkpoint as ckpt
from pdenet.cli import main
from pdenet.configs import build_model, get_config
from pdenet.data.camvid import PALETTE, SEGNET_WEIGHTS
from pdenet.data.paths import CHECKOUT_ROOT
from pdenet.segmentation import (SegmentationNet, SegmentationTask, class_iou, colorize, confusion_matrix, mean_iou,
                                 pixel_accuracy, resolve_class_weights, save_prediction_grid)
from pdenet.training import Trainer

V = 11  # CamVid's void label


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_on_hand_made_masks_with_void_and_absent_classes():
    # 4 classes; class 3 appears nowhere, class 2 is predicted but absent from the ground truth.
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 1, 1, V],
                           [V, V, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 1, 2, 3],   # the 3 sits on a void pixel: it must not count
                         [2, 0, 0, 0]])
    c = confusion_matrix(pred, target, 4, ignore_index=V)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1] = 4, 1       # class-0 pixels: 4 right, 1 taken for class 1
    expected[1, 1], expected[1, 2] = 3, 1       # class-1 pixels: 3 right, 1 taken for class 2
    assert torch.equal(c, expected)
    iou = class_iou(c)
    # IoU_0 = 4 / (5 + 4 - 4) = 4/5; IoU_1 = 3 / (4 + 4 - 3) = 3/5; IoU_2 = 0 / (0 + 1 - 0) = 0; class 3 absent.
    assert iou[:3].tolist() == pytest.approx([4 / 5, 3 / 5, 0.0])
    assert math.isnan(iou[3])
    assert mean_iou(c) == pytest.approx((4 / 5 + 3 / 5 + 0) / 3)  # mean over prediction ∪ ground truth
    assert pixel_accuracy(c) == pytest.approx(7 / 9)              # 9 labelled pixels, 7 right

    # Whatever is predicted on void pixels changes nothing; logits give the same as their arg-max.
    other = pred.clone()
    other[target == V] = 1
    assert torch.equal(confusion_matrix(other, target, 4, V), c)
    logits = F.one_hot(pred, 4).permute(2, 0, 1)[None].float()
    assert torch.equal(confusion_matrix(logits, target[None], 4, V), c)


def test_metrics_of_a_perfect_prediction_and_of_an_image_without_labels():
    target = torch.tensor([[2, 2, V], [5, 5, 5]])
    c = confusion_matrix(target.clone(), target, 6, V)
    assert mean_iou(c) == 1.0 and pixel_accuracy(c) == 1.0  # classes 0, 1, 3, 4 absent: not averaged in
    assert int(class_iou(c).isnan().sum()) == 4
    void_only = confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), V), 6, V)
    assert math.isnan(mean_iou(void_only)) and math.isnan(pixel_accuracy(void_only))


def test_metrics_reject_bad_input():
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match target shape"):
        confusion_matrix(torch.zeros(3, 2, dtype=torch.long), t, 4)
    with pytest.raises(ValueError, match=r"target class ids must lie in \[0, 4\)"):
        confusion_matrix(t, torch.full((2, 3), 7), 4)
    with pytest.raises(ValueError, match="logits must be"):
        confusion_matrix(torch.zeros(1, 5, 2, 3), t[None], 4)
    with pytest.raises(TypeError, match="integer class ids"):
        confusion_matrix(t, t.float(), 4)


# ------------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("size", [(45, 61), (64, 80), (33, 32), (1, 1)])
@pytest.mark.parametrize("config", ["lean-segnet", "dense-segnet"])
def test_network_keeps_the_spatial_size_of_odd_and_even_inputs(config, size):
    torch.manual_seed(0)
    net = build_model(config, num_classes=11, in_channels=3)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = net(x)
    assert out.shape == (2, 11, *size)
    out.square().mean().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("scheme,operator", [("parabolic", "lean"), ("euler", "separable"), ("euler", "grouped")])
def test_network_takes_any_scheme_and_operator_kind(scheme, operator):
    kwargs = {"groups": 4} if operator == "grouped" else None
    net = SegmentationNet(5, 1, widths=(8, 16), stem_width=4, scheme=scheme, operator=operator,
                          operator_kwargs=kwargs, decoder_width=8).eval()
    assert net(torch.randn(1, 1, 21, 30)).shape == (1, 5, 21, 30)
    assert {m.kind for m in net.decoder.modules() if hasattr(m, "kind")} == {operator}


def test_lean_network_has_at_least_4x_fewer_flops_and_parameters_than_its_dense_twin():
    from operators.flops import count_flops

    assert get_config("lean-segnet").dense_twin == "dense-segnet"
    lean, dense = (build_model(n, num_classes=11).eval() for n in ("lean-segnet", "dense-segnet"))
    assert [type(m) for m in lean.modules() if not hasattr(m, "kind")] == \
           [type(m) for m in dense.modules() if not hasattr(m, "kind")]  # same net but for the operators
    x = torch.randn(1, 3, 360, 480)
    with torch.no_grad():
        ratio = count_flops(dense, x) / count_flops(lean, x)
    params = sum(p.numel() for p in dense.parameters()) / sum(p.numel() for p in lean.parameters())
    assert ratio >= 4 and params >= 4, (ratio, params)


def test_network_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one encoder stage"):
        SegmentationNet(widths=())
    with pytest.raises(ValueError, match="decoder_width"):
        SegmentationNet(decoder_width=0)
    with pytest.raises(ValueError, match="unknown operator kind 'bogus'"):
        SegmentationNet(operator="bogus")
    with pytest.raises(ValueError, match="expects images"):
        SegmentationNet(widths=(8,))(torch.randn(3, 8, 8))


# ------------------------------------------------------------------------------------------------ task
class _Masks:
    """The attributes of a segmentation data set that the task reads."""

    def __init__(self, targets, class_weights=None):
        self.name, self.task, self.targets = "toy", "segmentation", targets
        self.num_classes, self.ignore_index, self.class_weights = 4, V, class_weights
        self.class_names, self.palette = ("a", "b", "c", "d"), PALETTE[:4] + (PALETTE[V],)
        self.mean, self.std = (0.5,) * 3, (0.25,) * 3


def test_loss_is_weighted_cross_entropy_ignoring_void():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randint(4, (2, 5, 6), generator=g)
    target[0, :2] = V
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    for weights in (None, w):
        task = SegmentationTask(4, V, weights)
        expected = F.cross_entropy(logits.float(), target, weight=weights, ignore_index=V)
        assert float(task.loss(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    all_void = torch.full_like(target, V)
    assert float(SegmentationTask(4, V, w).loss(logits, all_void)) == 0.0  # not nan
    with pytest.raises(ValueError, match="same size"):
        SegmentationTask(4, V).loss(logits, target[:, :4])


def test_task_metric_state_adds_over_batches():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 4, 6, 7, generator=g)
    target = torch.randint(5, (4, 6, 7), generator=g)
    target[target == 4] = V
    task = SegmentationTask(4, V)
    whole, parts = task.new_state("cpu"), task.new_state("cpu")
    task.update(whole, logits, target, task.loss(logits, target))
    for i in (slice(0, 1), slice(1, 4)):
        task.update(parts, logits[i], target[i], task.loss(logits[i], target[i]))
    assert torch.equal(whole[2:], parts[2:])
    summary = task.summarize(parts)
    c = confusion_matrix(logits, target, 4, V)
    assert summary["miou"] == pytest.approx(mean_iou(c)) and summary["pixel_accuracy"] == pytest.approx(pixel_accuracy(c))
    assert {k for k in summary if k.startswith("iou_")} == {f"iou_{n}" for n, v in zip("0123", class_iou(c)) if v == v}


def test_class_weight_options():
    masks = torch.tensor([[[0, 0, 0, 1]], [[0, 2, 2, V]]])  # per-image frequencies: 0 -> 4/7, 1 -> 1/4, 2 -> 2/3
    ds = _Masks(masks, class_weights=(1.0, 2.0, 3.0, 4.0))
    assert resolve_class_weights("none", ds) is None and resolve_class_weights(None, ds) is None
    assert resolve_class_weights("segnet-median-freq", ds).tolist() == [1.0, 2.0, 3.0, 4.0]
    median = 4 / 7  # median of (4/7, 1/4, 2/3); class 3 never occurs: weight 0
    assert resolve_class_weights("median-freq", ds).tolist() == pytest.approx(
        [1.0, median / (1 / 4), median / (2 / 3), 0.0], rel=1e-6)
    assert resolve_class_weights("1,2,3,0.5", ds).tolist() == [1.0, 2.0, 3.0, 0.5]
    with pytest.raises(ValueError, match="neither one of"):
        resolve_class_weights("inverse-frequency", ds)
    with pytest.raises(ValueError, match="4 finite non-negative"):
        resolve_class_weights("1,2,3", ds)
    with pytest.raises(ValueError, match="no published SegNet"):
        resolve_class_weights("segnet-median-freq", _Masks(masks))
    assert SEGNET_WEIGHTS == (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614)


# ------------------------------------------------------------------------------------------------ pictures
def test_colorize_and_prediction_grid(tmp_path):
    mask = np.array([[0, 3, V], [8, 10, 1]])
    rgb = colorize(mask)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[0, 0].tolist() == [128, 128, 128] and rgb[0, 1].tolist() == [128, 64, 128]
    assert rgb[0, 2].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == list(PALETTE[10])
    with pytest.raises(ValueError, match="outside"):
        colorize(np.array([[0, 13]]))
    images = torch.randint(0, 256, (2, 3, 30, 40), dtype=torch.uint8)
    targets = torch.randint(0, 12, (2, 30, 40))
    path = save_prediction_grid(images, targets, targets.clamp(max=10), tmp_path / "p.png", [str(i) for i in range(11)])
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 3 * 40
    with pytest.raises(ValueError, match="must both be"):
        save_prediction_grid(images, targets, targets[:1], tmp_path / "q.png", [str(i) for i in range(11)])


# ------------------------------------------------------------------------------------------------ CLI
def write_camvid(root, splits=(("train", 8), ("val", 4)), size=(24, 32)):
    """A CamVid folder in the SegNet layout: sky above road, a car at a random place, a void top row;
    each class has its palette colour plus noise."""
    g = np.random.default_rng(0)
    h, w = size
    folder = root / "CamVid"
    for split, n in splits:
        (folder / split).mkdir(parents=True)
        (folder / f"{split}annot").mkdir()
        lines = []
        for i in range(n):
            mask = np.full((h, w), 0, np.uint8)
            mask[h // 2:] = 3
            top, left = g.integers(4, h - 8), g.integers(0, w - 8)
            mask[top:top + 6, left:left + 8] = 8
            mask[0] = V
            image = (np.asarray(PALETTE)[mask] + g.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / split / f"f{i}.png")
            Image.fromarray(mask).save(folder / f"{split}annot" / f"f{i}.png")
            lines.append(f"/SegNet/CamVid/{split}/f{i}.png /SegNet/CamVid/{split}annot/f{i}.png")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def camvid_dir(tmp_path_factory):
    return write_camvid(tmp_path_factory.mktemp("camvid"))


def seg_args(data_dir, out, *extra):
    return ["train", "--task", "segmentation", "--data", "camvid", "--data-dir", str(data_dir), "--config",
            "lean-segnet", "--epochs", "3", "--batch-size", "4", "--eval-batch-size", "4", "--threads", "1",
            "--no-progress", "--out", str(out), *extra]


def test_cli_trains_segmentation_and_lowers_the_loss(camvid_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(seg_args(camvid_dir, out, "--class-weights", "segnet-median-freq")) == 0
    stdout = capsys.readouterr().out
    assert "test mIoU" in stdout and "test pixel accuracy" in stdout
    history = json.loads((out / "metrics.json").read_text())
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert 0 <= history[-1]["test_miou"] <= 1 and "test_iou_Car" in history[-1]
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "segmentation" and report["artifacts"] == ["predictions.png"]
    assert report["test"]["miou"] == history[-1]["test_miou"]
    assert (out / "predictions.png").is_file()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["eval_split"] == "val" and settings["class_weights"] == "segnet-median-freq"
    assert main(["evaluate", str(out), "--data-dir", str(camvid_dir), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["miou"] == pytest.approx(history[-1]["test_miou"])


def test_cli_segmentation_resume_reproduces_the_uninterrupted_run(camvid_dir, tmp_path, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(seg_args(camvid_dir, full, "--epochs", "2", "--no-channels-last")) == 0
    save = Trainer.save

    def save_then_die(self, path, meta):
        save(self, path, meta)
        if self.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_die)
    assert main(seg_args(camvid_dir, killed, "--epochs", "2", "--no-channels-last")) == 130
    monkeypatch.undo()
    assert main(["train", "--out", str(killed), "--resume", "--no-progress", "--data-dir", str(camvid_dir)]) == 0
    a, b = ckpt.load_checkpoint(full), ckpt.load_checkpoint(killed)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert b["history"][-1]["test_miou"] == a["history"][-1]["test_miou"]


def test_cli_reports_missing_and_corrupt_camvid_files(tmp_path, capsys):
    assert main(seg_args(tmp_path / "nowhere", tmp_path / "r0")) == 2
    assert "CamVid not found" in capsys.readouterr().err
    folder = write_camvid(tmp_path, splits=(("train", 2), ("val", 1)), size=(16, 16))
    (folder / "trainannot" / "f1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(seg_args(tmp_path, tmp_path / "r1")) == 2
    err = capsys.readouterr().err
    assert "error" in err and "trainannot/f1.png" in err
    (folder / "trainannot" / "f1.png").unlink()
    assert main(seg_args(tmp_path, tmp_path / "r2")) == 2
    assert "trainannot/f1.png is missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_short_run_on_real_camvid_crops_lowers_the_loss():
    from pdenet.data import BatchLoader, load_dataset
    from pdenet.training import TrainConfig

    if not (CHECKOUT_ROOT / "CamVid" / "train").is_dir():
        pytest.skip(f"the CamVid development copy is not at {CHECKOUT_ROOT / 'CamVid'}")
    data = load_dataset("camvid", "train", CHECKOUT_ROOT)
    part = data.subset(range(8))  # 96x128 crops from the middle of 8 scenes
    crops = replace(part, images=part.images[..., 120:216, 160:288].contiguous(),
                    targets=part.targets[..., 120:216, 160:288].contiguous())
    torch.manual_seed(0)
    model = build_model("lean-segnet", num_classes=11)
    task = SegmentationTask.from_dataset(crops, {"class_weights": "segnet-median-freq"})
    config = TrainConfig(epochs=6, batch_size=4, optimizer="adamw", lr=5e-3, weight_decay=1e-4)
    loader = BatchLoader(crops, 4, shuffle=True, seed=0, drop_last=True)
    trainer = Trainer(model, task, config, len(loader))
    history = trainer.fit(loader, show_progress=False)
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"], [r["train_loss"] for r in history]
