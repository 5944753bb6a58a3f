"""The membership ground truth of the digits audit (docs/audit.md, "Ground truth"): a small
``UNet2DModel`` trained on 128 digits drawn at random from scikit-learn's 1,797 (the members)
until it overfits them; the next 128 of the same draw are its non-members, from the same
distribution (``examples/audit_digits.py --train_membership``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from siss._digits.data import load_digit_classes
from siss._digits.models import build_scheduler, build_unet, save_model


def membership_split(
    count: int = 128, seed: int = 0, size: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Members and non-members of one distribution: ``2 * count`` of scikit-learn's digits.

    A seeded random permutation of the 1,797 digits; its first ``count`` are the members (the
    membership model's training set), the next ``count`` the non-members.

    Returns:
        ``(members, nonmembers, member_index, nonmember_index)``: ``(count, 1, size, size)``
        float32 in ``[-1, 1]`` twice, and the ``(count,)`` int64 indices into the digits.
    """
    images, _ = load_digit_classes(size=size)
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= len(images) // 2:
        raise ValueError(f"`count` must be an int in [2, {len(images) // 2}], got {count!r}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    member_index, nonmember_index = order[:count], order[count : 2 * count]
    return images[member_index], images[nonmember_index], member_index, nonmember_index


def membership_auc(unet, scheduler, members: torch.Tensor, nonmembers: torch.Tensor) -> dict:
    """The membership check's set-level AUC and TPR@1%FPR for both attacks, as JSON."""
    from siss.audit.membership import membership_check

    result = {}
    for score in ("loss", "pia"):
        overall = membership_check(
            unet,
            scheduler,
            members,
            nonmembers,
            score=score,
            generator=torch.Generator().manual_seed(0),
            batch_size=256,
        )[-1]
        result[score] = {
            name: {"value": e.value, "low": e.low, "high": e.high, "n": e.n}
            for name, e in overall.statistics.items()
        }
    return result


def train_membership_model(
    out: Path,
    *,
    count: int = 128,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Trains ``build_unet(widths=(16, 32, 32))`` on :func:`membership_split`'s members, saved.

    The plain DDPM loss (epsilon prediction, pretrain.py's schedule), AdamW at a constant
    ``lr``, rows drawn with replacement; raw weights (no EMA: the point is to overfit). Writes
    ``out`` (weights as safetensors, the scheduler, ``training_info.json`` with the split and
    :func:`membership_auc`) atomically. Returns the training info.
    """
    members, nonmembers, member_index, nonmember_index = membership_split(count, seed)
    torch.manual_seed(seed)  # the UNet's initialisation
    unet = build_unet(members.shape[-1], widths=(16, 32, 32))
    scheduler = build_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    unet.train()
    recent = torch.zeros(())
    start = time.time()
    for step in tqdm(range(steps), desc="membership model", disable=not progress, mininterval=5):
        rows = torch.randint(0, count, (batch_size,), generator=generator)
        clean = members[rows]
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        noise = torch.randn(clean.shape, generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(clean, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - 100:
            recent = recent + loss.detach()
    wall = time.time() - start
    unet.eval()
    info = {
        "purpose": "membership-inference ground truth: members vs non-members of one distribution",
        "command": f"python -m examples.audit_digits --train_membership {out}",
        "args": {"count": count, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed},
        "split": {
            "source": "sklearn digits (1,797), 16x16 in [-1, 1]",
            "count": count,
            "seed": seed,
            "size": int(members.shape[-1]),
            "member_index": member_index.tolist(),
            "nonmember_index": nonmember_index.tolist(),
        },
        "train_images": count,
        "epochs": steps * batch_size / count,
        "final_loss_mean_last_100": float(recent) / min(100, steps),
        "train_wall_s": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "weights": "raw (no EMA)",
        "membership_auc": membership_auc(unet, scheduler, members, nonmembers),
    }
    save_model(out, unet, scheduler, info)
    return info


def read_split(model: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The members and non-members of the membership model in folder ``model``."""
    info_path = Path(model) / "training_info.json"
    if not info_path.exists():
        raise FileNotFoundError(
            f"--membership_model {model}: no training_info.json (train one with "
            "--train_membership DIR)"
        )
    split = json.loads(info_path.read_text())["split"]
    members, nonmembers, member_index, nonmember_index = membership_split(
        split["count"], split["seed"], split["size"]
    )
    if member_index.tolist() != split["member_index"]:  # a changed digits loader, say
        raise ValueError(f"{info_path}: the split no longer matches the recorded member indices")
    if nonmember_index.tolist() != split["nonmember_index"]:
        raise ValueError(f"{info_path}: the split no longer matches the recorded non-members")
    return members, nonmembers
