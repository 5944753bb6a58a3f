"""The digits audit's inputs and its member/non-member pair (docs/audit.md, "Ground truth").

    python -m examples.audit_digits --output_dir outputs/audit/data
    python -m siss.audit --model examples/assets/pretrained --model examples/assets/retrain \\
        --forget outputs/audit/data/tshirt.pt --reference outputs/audit/data/tshirt_variants.pt \\
        --out outputs/audit
    python -m siss.audit --model examples/assets/membership --checks membership \\
        --forget outputs/audit/data/members.pt --reference outputs/audit/data/nonmembers.pt \\
        --out outputs/audit-membership

``tshirt.pt`` is ``siss._digits.data.make_tshirt()`` (1, 1, 16, 16), the image injected at 1% into
the pretrained model's training set; ``tshirt_variants.pt`` holds ``--count`` procedurally varied
T-shirts (``siss._digits.data.make_tshirt_variants``, seed ``--seed``) that no shipped model trained
on: the reference non-members of the T-shirt (see docs/audit.md for why they are the fair
comparison). The shipped T-shirt models trained on every digit, so they have no digits that are
non-members: the membership AUC needs a model of its own. ``examples/assets/membership`` is one, a
small ``UNet2DModel`` trained on 128 digits drawn at random from scikit-learn's 1,797 (the members)
until it overfits them; the next 128 of the same draw are its non-members, from the same
distribution. ``members.pt`` and ``nonmembers.pt`` are that split, read from the model's
``training_info.json``; ``--train_membership DIR`` trains the model again (about 3 minutes on one
CPU thread; the shipped one was made with ``--train_membership examples/assets/membership``).
``--figure PATH`` draws the T-shirt and 12 variants (docs/audit/reference.png). Tensors in [-1, 1],
the models' range; every file written atomically. """

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from siss._cli import CommandParser, add_output_flag, add_runtime_flags, flag
from siss._digits.data import make_tshirt, make_tshirt_variants
from siss._digits.membership import read_split, train_membership_model
from siss._files import atomic_path

MEMBERSHIP_MODEL = Path(__file__).resolve().parent / "assets" / "membership"


def save(tensor: torch.Tensor, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(tensor, tmp)


# ------------------------------------------------------------------ the reference figure


def reference_figure(path: Path, variants: torch.Tensor, shown: int = 12) -> None:
    """The T-shirt and the first ``shown`` variants in one row (docs/audit/reference.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [make_tshirt(variants.shape[-1]), *variants[:shown]]
    fig, axes = plt.subplots(1, len(images), figsize=(0.75 * len(images), 1.0))
    for index, (ax, image) in enumerate(zip(axes, images, strict=True)):
        ax.imshow((image[0] + 1) / 2, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("T-shirt" if index == 0 else f"ref {index - 1}", fontsize=7)
    fig.tight_layout(pad=0.2, w_pad=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def build_parser() -> CommandParser:
    """This script's flags (diffusers' names where diffusers has the flag) and their checks."""
    p = CommandParser(prog="python -m examples.audit_digits", description=__doc__.split("\n\n")[0])
    add_output_flag(
        p,
        default=Path("outputs/audit/data"),
        old=("--out",),
        help="the folder the tensors are written into",
    )
    flag(
        p,
        "--count",
        type=int,
        default=128,
        at_least=1,
        help="reference T-shirt variants (>= 104: docs/audit.md)",
    )
    flag(p, "--seed", type=int, default=1, at_least=0, help="seed of the variants")
    flag(
        p,
        "--resolution",
        old=("--size",),
        type=int,
        default=16,
        at_least=1,
        help="image side (the shipped models': 16)",
    )
    flag(
        p,
        "--membership_model",
        type=Path,
        default=MEMBERSHIP_MODEL,
        help="the member/non-member model whose split members.pt and nonmembers.pt hold",
    )
    flag(
        p,
        "--train_membership",
        type=Path,
        default=None,
        metavar="DIR",
        help="first train the membership model into DIR (then --membership_model DIR). "
        "Default: use --membership_model as it is",
    )
    flag(
        p,
        "--membership_count",
        type=int,
        default=128,
        at_least=2,
        at_most=898,
        help="members (= non-members): two disjoint sets of the 1,797 digits",
    )
    flag(
        p,
        "--membership_steps",
        type=int,
        default=1500,
        at_least=1,
        help="training steps of --train_membership",
    )
    flag(
        p,
        "--figure",
        type=Path,
        default=None,
        help="also draw the reference figure into this PNG. Default: no figure",
    )
    add_runtime_flags(p, device=False, threads=1)

    def check(args: argparse.Namespace) -> None:
        if args.train_membership is not None:
            return
        model = Path(args.membership_model)
        if not model.is_dir():
            raise ValueError(
                f"--membership_model {model}: no such folder (--train_membership DIR makes one)"
            )
        if not (model / "training_info.json").is_file():
            raise ValueError(
                f"--membership_model {model}: no training_info.json, not a membership model "
                "(--train_membership DIR makes one)"
            )

    p.add_check(check)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.train_membership is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        info = train_membership_model(
            args.train_membership,
            count=args.membership_count,
            steps=args.membership_steps,
            progress=not args.no_progress,
        )
        args.membership_model = args.train_membership
        auc = info["membership_auc"]
        print(
            f"wrote {args.train_membership} ({info['train_wall_s']:.0f} s); membership AUC: "
            + ", ".join(
                f"{score} {a['auc']['value']:.3f} [{a['auc']['low']:.3f}, {a['auc']['high']:.3f}]"
                for score, a in auc.items()
            )
        )
    out, size = args.output_dir, args.resolution
    variants, _ = make_tshirt_variants(
        args.count, torch.Generator().manual_seed(args.seed), size=size
    )
    save(make_tshirt(size).unsqueeze(0), out / "tshirt.pt")
    save(variants, out / "tshirt_variants.pt")
    members, nonmembers = read_split(args.membership_model)
    save(members, out / "members.pt")
    save(nonmembers, out / "nonmembers.pt")
    print(
        f"wrote tshirt.pt, tshirt_variants.pt ({args.count}), members.pt and nonmembers.pt "
        f"({len(members)} each, {args.membership_model}'s split) to {out}"
    )
    if args.figure is not None:
        reference_figure(args.figure, variants)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
