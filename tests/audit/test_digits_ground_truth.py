"""Ground truth of the audit (issue 9): the shipped digits models and the T-shirt.

``examples/assets/pretrained`` trained on the digits plus the T-shirt at 1%, ``retrain`` on the
digits alone. The reference non-members are procedurally varied T-shirts
(``digits.make_tshirt_variants``, seed 1) that neither model trained on. The T-shirt must come
out as held by pretrained and not held by retrain on each check. No threshold here is tuned: the
checks run with their documented defaults, only the sample counts are reduced in the cheap test.

The cheap test (default run) covers membership and reconstruction at t=250 with 72 reference
images (the fewest with which a percentile interval can lie beyond 5%); the slow test runs the
full default audit (1,000 samples, the NLL, the sweep, 128 references), as docs/audit.md reports.
"""

import sys
from pathlib import Path

import pytest
import torch

from siss.audit import audit

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "examples" / "assets"

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits():
    sys.path.insert(0, str(ROOT / "examples"))
    import digits

    return digits


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
