"""Train a lean network on Fashion-MNIST with pdenet's Python API, then report accuracy, costs and stability.

The same steps as ``pdenet train``, written out so that each piece can be changed: ``build_model`` builds a
named configuration, ``load_dataset`` reads the IDX files (nothing is downloaded), ``BatchLoader`` yields
normalized, augmented batches, ``Trainer`` runs SGD with a cosine schedule (and keeps every time-stepping
block inside its step bound when the block asks for it), and the end of the run measures parameters, FLOPs
per image, latency and the stability report of the trained network.

The default budget is tiny (5,000 training images, two epochs: well under a minute on 2 cores) so that the
script can be tried at once. A real run uses the whole training set::

    python examples/train_fashion_mnist.py --train-size 0 --test-size 0 --epochs 10

``--checkpoint FILE`` saves the trained model so that ``pdenet evaluate FILE`` and ``pdenet stability FILE``
can read it.
"""
from __future__ import annotations

import argparse
import time

import torch

from pdenet import BatchLoader, build_model, list_configs, load_dataset, stability_report
from pdenet.checkpoint import save_checkpoint
from pdenet.configs import parse_overrides
from pdenet.costs import count_parameters, flops_per_image, measure_latency
from pdenet.training import ClassificationTask, TrainConfig, Trainer, seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="lean-resnet20", choices=list_configs(),
                   help="named network configuration (default lean-resnet20)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a configuration default, e.g. nt=2 or 'widths=(16, 32)'; repeatable")
    p.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    p.add_argument("--train-size", type=int, default=5000,
                   help="training images, the first N of the training set; 0 = all 60,000 (default 5000)")
    p.add_argument("--test-size", type=int, default=1000,
                   help="test images, the first N of the test set; 0 = all 10,000 (default 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="default sgd (Nesterov momentum)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1 for sgd, 2e-3 for adamw)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    p.add_argument("--data-dir", help="folder holding the IDX files (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint", metavar="FILE", help="save the trained model to FILE")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


def first(dataset, n: int):
    """The first ``n`` samples of ``dataset`` (all of them for ``n = 0``)."""
    if n < 0:
        raise ValueError(f"a subset size must be >= 0, got {n}")
    return dataset if n == 0 or n >= len(dataset) else dataset.subset(slice(0, n))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.override)

    # data: uint8 tensors in memory; the loaders normalize and augment whole batches in torch
    train_set = first(load_dataset("fashion-mnist", "train", args.data_dir), args.train_size)
    test_set = first(load_dataset("fashion-mnist", "test", args.data_dir), args.test_size)
    shape = train_set.image_shape  # (1, 28, 28)

    # model and trainer
    seed_everything(args.seed)
    model = build_model(args.config, num_classes=train_set.num_classes, in_channels=shape[0], **overrides)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                         seed=args.seed)
    train_loader = BatchLoader(train_set, config.batch_size, shuffle=True, augment=True, seed=args.seed,
                               drop_last=True)
    test_loader = BatchLoader(test_set, 500, shuffle=False)
    if len(train_loader) < 1:
        raise SystemExit(f"--train-size {len(train_set)} is smaller than one batch ({config.batch_size})")
    task = ClassificationTask(train_set.num_classes)
    trainer = Trainer(model, task, config, steps_per_epoch=len(train_loader))

    print(f"{args.config}: {count_parameters(model):,} parameters; {len(train_set)} training and "
          f"{len(test_set)} test images; {config.epochs} epoch(s) of {len(train_loader)} steps")
    start = time.perf_counter()
    history = trainer.fit(train_loader, test_loader, show_progress=args.progress)
    seconds = time.perf_counter() - start
    for row in history:
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, test loss {row['test_loss']:.4f}, "
              f"test accuracy {row['test_accuracy']:.4f}")

    # costs: FLOPs from PyTorch's counter, latency measured here (median of repeated runs)
    flops = flops_per_image(model, shape)
    latency_ms = 1e3 * measure_latency(model, shape, batch_size=1, warmup=3, repeats=10)
    summary = {"config": args.config, "test_accuracy": history[-1]["test_accuracy"],
               "parameters": count_parameters(model), "flops_per_image": flops, "latency_ms": latency_ms,
               "training_seconds": seconds}
    print(f"test accuracy {summary['test_accuracy']:.4f} | {summary['parameters']:,} parameters | "
          f"{flops / 1e6:.2f} MFLOPs/image | {latency_ms:.2f} ms/image at batch 1 | trained in {seconds:.1f} s")

    # stability of the trained network's time-stepping blocks (none in a plain ResNet)
    print(stability_report(model, shape))

    if args.checkpoint:
        meta = {"config": args.config, "overrides": overrides, "num_classes": train_set.num_classes,
                "in_channels": shape[0], "input_shape": list(shape), "task": task.name, "data": "fashion-mnist"}
        save_checkpoint(args.checkpoint, model=model, epoch=trainer.epoch, meta=meta, history=history)
        print(f"saved {args.checkpoint}: try `pdenet stability {args.checkpoint}` or `pdenet evaluate "
              f"{args.checkpoint}`")
    return summary


if __name__ == "__main__":
    main()
