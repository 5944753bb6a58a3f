"""Ground truth of the audit (issue 9): the shipped digits models and the T-shirt.

``examples/assets/pretrained`` trained on the digits plus the T-shirt at 1%, ``retrain`` on the
digits alone. The reference non-members are procedurally varied T-shirts
(``digits.make_tshirt_variants``, seed 1) that neither model trained on. The T-shirt must come
out as held by pretrained and not held by retrain on each check. No threshold here is tuned: the
checks run with their documented defaults, only the sample counts are reduced in the cheap test.

The cheap test (default run) covers membership and reconstruction at t=250 with 72 reference
images (the fewest with which a percentile interval can lie beyond 5%); the slow test runs the
full default audit (1,000 samples, the NLL, the sweep, 128 references), as docs/audit.md reports.

The membership AUC needs members and non-members of one distribution, which the T-shirt models
lack (they trained on every digit). ``examples/assets/membership`` is a small UNet trained on 128
random digits (members) and shipped with its split; the next 128 of the same draw are its
non-members (``examples/audit_digits.py --train_membership``). On it the attacks must tell the
two apart (AUC interval above 0.5); on retrain, which trained on both halves, they must not.
"""

import json
from pathlib import Path

import pytest
import torch

from siss.audit import audit

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "examples" / "assets"

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits():
    from siss._digits import data

    return data


def _audit_digits():
    from examples import audit_digits

    return audit_digits


def _load(name):
    from diffusers import DDPMScheduler, UNet2DModel

    return (
        UNet2DModel.from_pretrained(ASSETS / name).eval(),
        DDPMScheduler.from_pretrained(ASSETS / name),
    )


def _inputs(count):
    digits = _digits()
    forget = digits.make_tshirt().unsqueeze(0)
    reference, _ = digits.make_tshirt_variants(count, torch.Generator().manual_seed(1))
    return forget, reference


def _verdicts(report):
    return {(r.check, r.image): r.held for r in report.results}


def test_variants_are_comparable_and_never_the_forget_image():
    digits = _digits()
    forget, reference = _inputs(72)
    assert reference.shape == (72, 1, 16, 16)
    assert float(reference.min()) >= -1 and float(reference.max()) <= 1
    distance = ((reference - forget) / 2).flatten(1).norm(dim=1)
    assert float(distance.min()) >= 1.0  # no near-copy of the T-shirt among the references
    again, params = digits.make_tshirt_variants(72, torch.Generator().manual_seed(1))
    assert torch.equal(again, reference) and params.shape == (72, 6)
    # the T-shirt's area is typical of the variants' (not an outlier of the family)
    area = ((reference + 1) / 2).flatten(1).sum(1)
    tshirt_area = float(((forget + 1) / 2).sum())
    assert float(area.min()) < tshirt_area < float(area.max())
    with pytest.raises(ValueError, match="count"):
        digits.make_tshirt_variants(0)


def test_pretrained_holds_the_tshirt_and_retrain_does_not_cheap():
    forget, reference = _inputs(72)
    reports = {}
    for name in ("pretrained", "retrain"):
        model, scheduler = _load(name)
        reports[name] = audit(
            model,
            scheduler,
            forget,
            reference,
            checks=["membership", "reconstruction"],
            seed=0,
            progress=False,
            label=name,
        )
    pretrained, retrain = (_verdicts(reports[n]) for n in ("pretrained", "retrain"))
    for check in ("membership", "reconstruction"):
        assert pretrained[(check, 0)] is True, reports["pretrained"].result(check).reason
        assert retrain[(check, 0)] is False, reports["retrain"].result(check).reason
    # margins: the T-shirt is more member-like than every variant under pretrained only
    assert reports["pretrained"].result("membership").statistics["percentile"].value == 0.0
    assert reports["retrain"].result("membership").statistics["percentile"].low > 0.05
    assert reports["pretrained"].result("reconstruction").statistics["percentile"].value == 1.0
    assert reports["retrain"].result("reconstruction").statistics["percentile"].high < 0.95
    # one forget image and no members: the AUC is not available, and says why
    auc = reports["pretrained"].result("membership", None).statistics["auc"]
    assert auc.status == "not measured" and "members" in auc.note


@pytest.mark.slow
def test_full_audit_separates_pretrained_from_retrain():
    """The docs/audit.md run (about 6 minutes per model on one CPU thread)."""
    forget, reference = _inputs(128)
    reports = {}
    for name in ("pretrained", "retrain"):
        model, scheduler = _load(name)
        reports[name] = audit(model, scheduler, forget, reference, seed=0, label=name)
    for check in ("generation", "likelihood", "reconstruction", "reconstruction_sweep"):
        pretrained = reports["pretrained"].result(check)
        retrain = reports["retrain"].result(check)
        assert pretrained.held is True, pretrained.reason
        assert retrain.held is False, retrain.reason
    assert reports["pretrained"].result("membership").held is True
    assert reports["retrain"].result("membership").held is False


# ------------------------------------------------------------------ membership AUC


def _membership_audit(name, score):
    members, nonmembers = _audit_digits().read_split(ASSETS / "membership")
    model, scheduler = _load(name)
    report = audit(
        model,
        scheduler,
        members,
        nonmembers,
        checks=["membership"],
        seed=0,
        progress=False,
        label=name,
        membership={"score": score},
    )
    return report, report.result("membership", None)


@pytest.mark.parametrize("score", ["loss", "pia"])
def test_membership_auc_tells_members_from_nonmembers(score):
    """The shipped member/non-member pair: AUC interval above 0.5 for both attacks."""
    report, overall = _membership_audit("membership", score)
    auc, tpr = overall.statistics["auc"], overall.statistics["tpr_at_fpr"]
    assert overall.held is True, overall.reason
    assert auc.measured and auc.low > 0.5 and auc.n == 256
    assert overall.details["n_members"] == 128 and overall.details["n_nonmembers"] == 128
    assert tpr.measured and tpr.low <= tpr.value <= tpr.high  # 128 >= 100 non-members
    # individual members: far more than the 5% a non-member would give are called held
    held = sum(r.held is True for r in report.results if r.image is not None)
    assert held > 128 * 0.05 + 4 * (128 * 0.05 * 0.95) ** 0.5


def test_membership_auc_is_at_chance_when_both_halves_are_members():
    """Control: retrain trained on all 1,797 digits, so the 'non-members' are members too; the
    same attack on the same images must not tell the halves apart (PIA here, the loss in the slow
    test)."""
    _, overall = _membership_audit("retrain", "pia")
    auc = overall.statistics["auc"]
    assert auc.measured and auc.low <= 0.5 <= auc.high
    assert overall.held is False


@pytest.mark.slow
def test_membership_loss_auc_is_at_chance_on_retrain():
    _, overall = _membership_audit("retrain", "loss")
    auc = overall.statistics["auc"]
    assert auc.measured and auc.low <= 0.5 <= auc.high and overall.held is False


def test_membership_model_script_writes_a_pair_it_can_read_back(tmp_path):
    """audit_digits.py --train_membership on the smallest settings: the model folder, its split
    in training_info.json, the tensors that split gives, and the reference figure."""
    from diffusers import UNet2DModel

    audit_digits = _audit_digits()
    model, data = tmp_path / "membership", tmp_path / "data"
    audit_digits.main([
        "--train_membership", str(model), "--membership_count", "4", "--membership_steps", "2",
        "--output_dir", str(data), "--count", "3", "--figure", str(tmp_path / "reference.png"),
        "--no_progress",
    ])  # fmt: skip
    info = json.loads((model / "training_info.json").read_text())
    assert info["split"]["count"] == 4 and len(info["split"]["member_index"]) == 4
    assert not set(info["split"]["member_index"]) & set(info["split"]["nonmember_index"])
    assert info["membership_auc"]["loss"]["auc"]["n"] == 8
    members, nonmembers = torch.load(data / "members.pt"), torch.load(data / "nonmembers.pt")
    from siss._digits.membership import membership_split, read_split

    again, _, index, _ = membership_split(4, 0)
    assert torch.equal(members, again) and index.tolist() == info["split"]["member_index"]
    assert nonmembers.shape == (4, 1, 16, 16)
    assert tuple(UNet2DModel.from_pretrained(model).config.block_out_channels) == (16, 32, 32)
    assert (tmp_path / "reference.png").stat().st_size > 0
    assert torch.load(data / "tshirt_variants.pt").shape == (3, 1, 16, 16)
    info["split"]["member_index"][0] += 1  # a split that no longer matches is refused
    (model / "training_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="member indices"):
        read_split(model)
