"""The documentation cannot rot: the tutorials' code runs, their commands parse, and the example training script
trains. (The site itself, its API reference generated from the docstrings, its links and its pages in a browser,
are checked by tests/test_docs_site.py.)

- The ```python blocks of each docs/tutorials/*.md run in order in one namespace, in a temporary directory,
  with ``PDENET_QUICK=1`` and matplotlib's Agg backend. ```python no-run blocks are shown, not run; a block
  tagged ``needs-data=NAME`` skips the rest of its tutorial, with the reason, when data set NAME is not on disk;
  a block tagged ``file=NAME.py`` is written to that file in the temporary directory instead of being run (a
  module the page asks the reader to save, which later blocks import or pass to ``--import``).
- Every ``pdenet ...``, ``torchrun ... -m pdenet.cli ...`` and ``python examples/train_fashion_mnist.py ...``
  command in a ```bash block of the docs is accepted by the real argument parser.
"""
from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import re
import shlex
import struct
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + sorted((DOCS / "tutorials").glob("*.md"))
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
EXAMPLE = ROOT / "examples" / "train_fashion_mnist.py"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
DATA_SPLITS = {"fashion-mnist": "test", "cifar10": "test", "cifar100": "test", "camvid": "val"}


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
    """``(info string, code, line number)`` of every fenced block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


# ------------------------------------------------------------------------------------------- tutorials
@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def data_available(name: str) -> str | None:
    """``None`` if data set ``name`` can be read, else why not."""
    from pdenet.data import load_dataset

    try:
        load_dataset(name, DATA_SPLITS.get(name, "test"))
    except (FileNotFoundError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None


def test_every_tutorial_has_runnable_code():
    assert TUTORIALS, "docs/tutorials/ holds no tutorials"
    for path in TUTORIALS:
        assert any(info.split()[:1] == ["python"] and "no-run" not in info and "file=" not in info
                   for info, _, _ in code_blocks(path)), \
            f"{path.name} has no ```python block that the tests run"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_code_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PDENET_QUICK", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as for Python started there: the page's own modules import
    namespace = {"__name__": "__main__"}
    for info, code, line in code_blocks(path):
        words = info.split()
        if words[:1] != ["python"] or "no-run" in words:
            continue
        files = [w.split("=", 1)[1] for w in words if w.startswith("file=")]
        if files:
            (tmp_path / files[0]).write_text(code, encoding="utf-8")
            continue
        for word in words:
            if word.startswith("needs-data="):
                missing = data_available(word.split("=", 1)[1])
                if missing:
                    pytest.skip(f"{path.name} line {line} needs real data: {missing}")
        try:
            with _quiet():
                exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the python block at {path.relative_to(ROOT)}:{line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        finally:
            plt.close("all")


# ------------------------------------------------------------------------------------------- commands
def commands(path: Path) -> list[tuple[list[str], int]]:
    """The ``pdenet`` and example-script command lines of the ```bash blocks of ``path``."""
    found = []
    for info, code, line in code_blocks(path):
        if info.split()[:1] not in (["bash"], ["console"], ["sh"]):
            continue
        for segment in re.split(r"&&|\|\||;|\|", code.replace("\\\n", " ")):
            for text in segment.splitlines():
                words = shlex.split(text.strip().removeprefix("$ "), comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # environment assignments such as PDENET_QUICK=1
                if words[:1] == ["torchrun"] and "pdenet.cli" in words:
                    words = ["pdenet", *words[words.index("pdenet.cli") + 1:]]  # torchrun ... -m pdenet.cli ARGS
                if words[:1] == ["pdenet"] or words[:2] == ["python", "examples/train_fashion_mnist.py"]:
                    found.append((words, line))
    return found


def test_documented_commands_parse():
    from pdenet.cli import build_parser

    example = load_module(EXAMPLE, "train_fashion_mnist")
    checked = 0
    for path in PAGES:
        for words, line in commands(path):
            try:
                with _quiet():
                    if words[0] == "pdenet":
                        build_parser().parse_args(words[1:])
                    else:
                        example.parse_args(words[2:])
            except SystemExit as exc:
                if exc.code not in (0, None):
                    pytest.fail(f"{path.relative_to(ROOT)}:{line}: `{shlex.join(words)}` is rejected by the parser")
            checked += 1
    assert checked >= 5, f"only {checked} documented commands found"


# ------------------------------------------------------------------------------------------- example script
def write_idx(path: Path, array) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype("uint8").tobytes()))


def test_example_training_script(tmp_path):
    """The script trains a small PDE-ResNet on generated Fashion-MNIST files and saves a loadable checkpoint."""
    from pdenet.checkpoint import load_model

    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        labels = torch.randint(10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, k in enumerate(labels.tolist()):
            images[i, 2 * k + 3:2 * k + 6, 4:24] += 180  # class k lights up its own stripe
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images.numpy())
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels.numpy())
    example = load_module(EXAMPLE, "train_fashion_mnist")
    checkpoint = tmp_path / "model.pt"
    with _quiet():
        summary = example.main(["--data-dir", str(tmp_path), "--train-size", "0", "--test-size", "0",
                                "--epochs", "2", "--batch-size", "16", "--config", "pde-parabolic-lean",
                                "--override", "widths=(4, 8)", "--override", "nt=1", "--threads", "1",
                                "--no-progress", "--checkpoint", str(checkpoint)])
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["parameters"] > 0 and summary["flops_per_image"] > 0 and summary["latency_ms"] > 0
    model, meta = load_model(checkpoint)
    assert meta["config"] == "pde-parabolic-lean" and meta["overrides"] == {"widths": (4, 8), "nt": 1}
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
