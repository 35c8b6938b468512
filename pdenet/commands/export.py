"""``pdenet export CHECKPOINT --format onnx|pt2|safetensors``: a saved model as a file other tools run."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ._common import CommandError, fail

HELP = "export a saved model to ONNX, a torch.export program (.pt2) or safetensors weights"
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "safetensors": ".safetensors"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export import FORMATS

    p.add_argument("checkpoint", help="checkpoint.pt, weights.safetensors, or the output directory of a training run")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx: standard ONNX operators, batch norms folded (needs pip install 'pdenet[onnx]'); "
                        "pt2: torch.export program with pdenet's operators (load after import pdenet_kernels); "
                        "safetensors: the weights alone")
    p.add_argument("--out", help="output file (default: model.onnx / model.pt2 / weights.safetensors beside the "
                                 "checkpoint)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the exported file against PyTorch (onnxruntime for onnx, torch.export.load "
                        "for pt2)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_model, save_weights
    from ..export import export_onnx, export_pt2, inference_copy, run_onnx

    try:
        try:
            model, meta = load_model(args.checkpoint)
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        source = Path(args.checkpoint)
        folder = source if source.is_dir() else source.parent
        stem = "weights" if args.format == "safetensors" else "model"
        out = Path(args.out) if args.out else folder / f"{stem}{SUFFIXES[args.format]}"
        if not out.parent.is_dir():
            raise CommandError(f"the output folder {out.parent} does not exist")
        if args.format == "safetensors":
            save_weights(out, model, meta)
            print(f"wrote {out}: the weights of {meta['config']} ({sum(p.numel() for p in model.parameters())} "
                  "parameters)")
            return 0
        shape = meta.get("input_shape") or [meta["in_channels"], 32, 32]
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on absent torchvision operators
        try:
            (export_onnx if args.format == "onnx" else export_pt2)(model, example, out)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
    except (CommandError, OSError) as exc:
        return fail("export", exc)

    folded, report = inference_copy(model)
    print(report)
    print(f"wrote {out}: {meta['config']} for inputs (batch, {', '.join(map(str, shape))}), any batch size")
    if args.check:
        with torch.no_grad():
            expected = folded(example)
            if args.format == "onnx":
                try:
                    got = torch.from_numpy(run_onnx(out, example))
                except RuntimeError as exc:
                    print(f"not checked: {exc}")
                    return 0
                runner = "onnxruntime"
            else:
                got, runner = torch.export.load(str(out)).module()(example), "torch.export.load"
        error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-30))
        print(f"checked with {runner}: largest difference from PyTorch {error:.2e} of the output's scale")
        if not error < 1e-4:
            return fail("export", CommandError(f"the exported file's output differs from PyTorch's by {error:.2e}"))
    return 0
