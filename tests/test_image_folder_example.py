"""``examples/train_image_folder.py``: a pdenet network trained through a standard ``DataLoader`` (with a worker
process) on a folder of PNG and JPEG images, one subfolder per class; unreadable input is named."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_image_folder.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_image_folder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_folder(root: Path, per_class: int = 40) -> Path:
    """Two classes a network tells apart at once: the bright half of each image is its left or its right."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (20, 20, 3)).astype(np.uint8)
            pixels[:, :10] += 150 if label == 0 else 0
            pixels[:, 10:] += 150 if label == 1 else 0
            Image.fromarray(pixels).save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_trains_on_an_image_folder_through_a_dataloader(tmp_path):
    example = load_example()
    root = make_folder(tmp_path / "images")
    images = example.ImageFolder(root, size=16)
    assert images.classes == ["left", "right"] and len(images) == 80
    image, label = images[0]
    assert image.shape == (3, 16, 16) and 0 <= float(image.min()) and float(image.max()) <= 1 and label == 0
    row = example.train(root, size=16, epochs=6, batch_size=8, workers=1, show_progress=False)
    assert row["epoch"] == 6 and row["test_accuracy"] >= 0.75


def test_unusable_folders_and_images_are_named(tmp_path):
    example = load_example()
    with pytest.raises(FileNotFoundError, match="no image folder"):
        example.ImageFolder(tmp_path / "missing")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two class folders"):
        example.ImageFolder(tmp_path / "one")
    root = make_folder(tmp_path / "broken", per_class=2)
    (root / "left" / "000.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read the image .*000.jpg"):
        example.ImageFolder(root)[0]
