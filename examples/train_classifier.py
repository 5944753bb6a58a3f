"""Train the small digit classifier used to score samples of the digits example.

This script shows how the Inception-Score and FID-style metrics of the digits example get
their feature extractor: it trains :class:`siss.metrics.DigitClassifier` (a ~0.2M-parameter
CNN) on scikit-learn's digits upsampled to 16x16 in ``[-1, 1]`` (10 classes; the injected
T-shirt outlier is not a class), with random one-pixel shifts as augmentation, reports the
accuracy on a stratified held-out split and writes the weights atomically to
``outputs/classifier/digit_classifier.safetensors``; ``--output_dir examples/assets`` replaces
the shipped ``examples/assets/digit_classifier.safetensors`` the examples read (how it was made).
It takes well under a minute on one CPU thread::

    python -m examples.train_classifier
    python -m examples.train_classifier --output_dir examples/assets   # the shipped weights
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from siss._cli import (
    CommandParser,
    add_output_flag,
    add_runtime_flags,
    add_training_flags,
    flag,
    old_spelling,
)
from siss._digits.data import load_digit_classes
from siss._digits.state import write_tensors_atomically
from siss.metrics import DigitClassifier

WEIGHTS = "digit_classifier.safetensors"
DEFAULT_OUTPUT = Path("outputs/classifier") / WEIGHTS  # shipped: examples/assets/{WEIGHTS}


def stratified_split(
    labels: torch.Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, test)`` with ``test_fraction`` of every class in the test split."""
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = round(test_fraction * idx.numel())
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(test)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by up to ``max_shift`` pixels in x and y, padding with -1."""
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    size = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    pred = model(images).logits.argmax(1)
    return float((pred == labels).float().mean())


def build_parser() -> CommandParser:
    """This script's flags (diffusers' names where diffusers has the flag) and their checks."""
    p = CommandParser(
        prog="python -m examples.train_classifier", description=__doc__.split("\n\n")[0]
    )
    add_output_flag(
        p,
        default=DEFAULT_OUTPUT.parent,
        help=f"the folder {WEIGHTS} is written into",
    )
    # train_classifier.py's --output named the file itself: accepted until 0.3.0
    old_spelling(p, "--output", "--output_dir", dest="output_file", type=Path)
    flag(
        p,
        "--num_train_epochs",
        old=("--epochs",),
        type=int,
        default=30,
        at_least=1,
        help="passes over the training split",
    )
    add_training_flags(
        p,
        train_batch_size=64,
        learning_rate=1e-3,
        seed=0,
        helps={
            "learning_rate": "peak AdamW learning rate of the one-cycle schedule",
            "seed": "seed of the split, the initialisation, the order and the shifts",
        },
    )
    flag(
        p,
        "--test_fraction",
        type=float,
        default=0.2,
        above=0,
        below=1,
        help="share of each class held out for the test accuracy",
    )
    flag(
        p,
        "--max_shift",
        type=int,
        default=1,
        at_least=0,
        help="augmentation: random shifts of up to this many pixels",
    )
    add_runtime_flags(p, device=False, threads=1)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags (``error``, exit code 2, on a bad one)."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = getattr(args, "output_file", None) or Path(args.output_dir) / WEIGHTS
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digit_classes(size=16)
    train_idx, test_idx = stratified_split(labels, args.test_fraction, generator)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    batch = args.train_batch_size
    steps_per_epoch = (x_train.shape[0] + batch - 1) // batch
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.num_train_epochs * steps_per_epoch
    )
    start = time.time()
    for _ in tqdm(range(args.num_train_epochs), desc="train classifier", disable=args.no_progress):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=generator)
        for i in range(0, x_train.shape[0], batch):
            idx = order[i : i + batch]
            x = random_shift(x_train[idx], args.max_shift, generator)
            loss = F.cross_entropy(model(x).logits, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_sched.step()
    wall = time.time() - start
    train_acc = accuracy(model, x_train, y_train)
    test_acc = accuracy(model, x_test, y_test)
    write_tensors_atomically(output, model.state_dict(), metadata={"format": "pt"})
    print(
        f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} "
        f"({x_test.shape[0]} held-out images), {wall:.0f} s; saved {output}"
    )
    return test_acc


if __name__ == "__main__":
    main()
