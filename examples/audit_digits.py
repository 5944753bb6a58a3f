"""Write the digits audit's inputs: the T-shirt to forget and the reference T-shirt variants.

    python examples/audit_digits.py --out outputs/audit/data
    python -m siss.audit --model examples/assets/pretrained --model examples/assets/retrain \\
        --forget outputs/audit/data/tshirt.pt --reference outputs/audit/data/tshirt_variants.pt \\
        --out outputs/audit

``tshirt.pt`` is ``digits.make_tshirt()`` (1, 1, 16, 16), the image injected at 1% into the
pretrained model's training set; ``tshirt_variants.pt`` holds ``--count`` procedurally varied
T-shirts (``digits.make_tshirt_variants``, seed ``--seed``) that no shipped model trained on:
the reference non-members (see docs/audit.md for why they are the fair comparison).
Both in [-1, 1], the models' range; written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import make_tshirt, make_tshirt_variants


def save(tensor: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(tensor, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("outputs/audit/data"), help="output folder")
    p.add_argument(
        "--count", type=int, default=128, help="reference T-shirt variants (>= 104: docs/audit.md)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the variants")
    p.add_argument("--size", type=int, default=16, help="image side (the shipped models': 16)")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be >= 1")
    variants, _ = make_tshirt_variants(
        args.count, torch.Generator().manual_seed(args.seed), size=args.size
    )
    save(make_tshirt(args.size).unsqueeze(0), args.out / "tshirt.pt")
    save(variants, args.out / "tshirt_variants.pt")
    print(f"wrote {args.out / 'tshirt.pt'} and {args.out / 'tshirt_variants.pt'} ({args.count})")


if __name__ == "__main__":
    main()
