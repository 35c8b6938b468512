"""``pdenet stability``: the stability report of a network's time-stepping blocks.

``pdenet stability --config NAME`` analyses a named configuration with random weights (``--seed``);
``pdenet stability CHECKPOINT`` a trained model. The report has one row per block (scheme, operator,
``‖K‖``, ``h``, bound, margin, stable, assumptions). ``--jacobian`` adds the leading eigenvalues of every
step's Jacobian against the scheme's stability region and the perturbation growth through the steps;
``--plot DIR`` draws them (and the operators' singular values); ``--json FILE`` writes everything.
"""
from __future__ import annotations

import argparse
import json

import torch

from ._common import CommandError, build_named_model, fail, parse_override_args, set_threads

HELP = "stability report of a network's time-stepping blocks (named config with random weights, or a checkpoint)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint.pt or a training run's output directory")
    p.add_argument("--config", metavar="NAME", help="named network configuration, with random weights")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a configuration default (with --config), e.g. h=0.5; repeatable")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a --config model (default 10)")
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="one input image (default: the checkpoint's, else 3 32 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--method", choices=("symbol", "power"), default="symbol",
                   help="‖K‖ from the Fourier symbol (an upper bound for zero padding) or by power iteration on "
                        "the block's grid (exact; slower)")
    p.add_argument("--jacobian", action="store_true",
                   help="also the leading Jacobian eigenvalues of every step and the perturbation growth")
    p.add_argument("--eigs", type=int, default=6, metavar="K", help="eigenvalues per step term (default 6)")
    p.add_argument("--json", metavar="FILE", help="write the report (and Jacobian results) to FILE as JSON")
    p.add_argument("--plot", metavar="DIR", help="write eigenvalues.png, growth.png and singular_values.png to DIR "
                                                 "(implies --jacobian)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def _load(args) -> tuple[torch.nn.Module, str, tuple[int, int, int]]:
    if (args.checkpoint is None) == (args.config is None):
        raise CommandError("give either a CHECKPOINT or --config NAME (exactly one)")
    if args.checkpoint is not None:
        if args.override:
            raise CommandError("--override applies to --config models only; a checkpoint keeps its settings")
        from ..checkpoint import load_model

        try:
            model, meta = load_model(args.checkpoint)
        except (OSError, ValueError, KeyError) as exc:
            raise CommandError(f"cannot load {args.checkpoint}: {exc}") from None
        shape = args.input_shape or meta.get("input_shape") or (meta["in_channels"], 32, 32)
        return model, f"{meta['config']} from {args.checkpoint}", tuple(shape)
    shape = tuple(args.input_shape or (3, 32, 32))
    torch.manual_seed(args.seed)
    model = build_named_model(args.config, args.num_classes, shape[0], parse_override_args(args.override))
    return model, f"{args.config} (random weights, seed {args.seed})", shape


def run(args) -> int:
    from ..stability import model_input, report

    try:
        set_threads(args.threads)
        if args.eigs < 1:
            raise CommandError(f"--eigs must be a positive integer, got {args.eigs}")
        model, what, shape = _load(args)
        result = report(model, shape, method=args.method, progress=not args.no_progress)
    except (CommandError, ValueError) as exc:
        return fail("stability", exc)
    print(f"stability report: {what}, input {shape[0]}x{shape[1]}x{shape[2]}, ‖K‖ by {args.method}")
    print(result.table())
    out = json.loads(result.to_json())
    out["model"] = what
    if (args.jacobian or args.plot) and result.rows:
        from ..jacobian import model_step_spectra, perturbation_growth

        x = model_input(model, shape, seed=args.seed)
        spectra = model_step_spectra(model, x, k=args.eigs, seed=args.seed, progress=not args.no_progress)
        growth = perturbation_growth(model, x, seed=args.seed)
        print("\nJacobian eigenvalues z = h^m·λ of each step (leading by modulus):")
        for s in spectra:
            print(f"  {s.block} {s.label:<20} {s.scheme:<18} max|z| = {abs(s.z).max():.4g}  "
                  f"outside the region: {int((~s.inside).sum())}/{s.z.size}")
        print(f"\nperturbation growth after the last step ({growth.labels[-1]}): random {growth.random[-1]:.4g}, "
              f"adversarial {growth.adversarial[-1]:.4g} (σ_max of the Jacobian {growth.sigma_max:.4g})")
        out["spectra"] = [s.as_dict() for s in spectra]
        out["growth"] = growth.as_dict()
        if args.plot:
            from pathlib import Path

            from ..plots import plot_eigenvalues, plot_growth, plot_singular_values

            directory = Path(args.plot)
            paths = [plot_eigenvalues(spectra, directory / "eigenvalues.png", title=what),
                     plot_growth(growth, directory / "growth.png", title=what),
                     plot_singular_values(model, shape, directory / "singular_values.png", title=what)]
            print("\nplots: " + ", ".join(paths))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0
