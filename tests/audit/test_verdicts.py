"""The three verdicts (held, not held, overshot) and the comparison with a reference model, per
check, on constructed cases with known answers.

Every check is run on the same construction: 1x2x2 images; the non-member references vary in
pixels 0-2 (``N(MU, S^2)``) and hardly in pixel 3 (``N(MU, (S / 10)^2)``); the forget image is a
typical point in pixels 0-2 and lies ``2 S`` off in pixel 3. Exact Gaussian models ``N(mean,
diag(s^2))`` (``audit_models.exact_model``) stand in for

* ``pretrained``: centred on the forget image (``s = 0.3 S``, or a point mass): it holds it;
* ``retrain``: ``N(MU, S^2 I)``, which never saw it: the forget image ranks among the references;
* ``like retrain``: ``N(MU, diag(S, S, S, 1.03 S))``, an unlearned model that lands next to it;
* ``overshot``: ``N(MU, diag(S, S, S, S / 20))``, squeezed along pixel 3, where the forget image
  alone differs: it is less likely, worse reconstructed and worse denoised than every reference.

The margins are many standard errors wide (see each test); every draw is seeded.
"""

import pytest
import torch
from diffusers import DDPMScheduler

from siss.audit import AuditReport, compare
from siss.audit.generation import generation_check
from siss.audit.likelihood import likelihood_check
from siss.audit.membership import membership_check
from siss.audit.memorization import memorization_check
from siss.audit.reconstruction import reconstruction_check, reconstruction_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S, R = 0.0, 0.5, 96  # 96 references: enough for a percentile verdict even at 2 Bonferroni t
ROLES = ("pretrained", "unlearned", "retrained")


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def forget_image(dtype=torch.float32):
    return (MU + S * torch.tensor([0.3, -0.3, 0.2, 2.0], dtype=dtype)).reshape(1, 1, 2, 2)


def references(dtype=torch.float32):
    z = torch.randn(R, 1, 2, 2, generator=seeded(1), dtype=torch.float64)
    z[..., 1, 1] *= 0.1  # pixel 3
    return (MU + S * z).to(dtype)


def spread(pixel3):
    return torch.tensor([S, S, S, pixel3], dtype=torch.float64).reshape(1, 1, 2, 2)


def models(audit_models, scales):
    """The four models of the module docstring, by role."""
    exact = audit_models.exact_model
    return {
        "pretrained": exact(scales, forget_image(torch.float64), 0.3 * S),
        "retrain": exact(scales, MU, S),
        "like retrain": exact(scales, MU, spread(1.03 * S)),
        "overshot": exact(scales, MU, spread(S / 20)),
    }


def assert_verdicts_and_comparison(results, statistic):
    """``results``: role -> the check's result for the forget image. The verdicts, and what
    ``compare`` says about the main ``statistic`` against the retrained model."""
    verdicts = {role: result.verdict for role, result in results.items()}
    assert verdicts == {
        "pretrained": "held",
        "retrain": "not held",
        "like retrain": "not held",
        "overshot": "overshot",
    }, {role: result.reason for role, result in results.items()}
    assert results["overshot"].held is False and results["pretrained"].held is True
    reports = {role: AuditReport(role, [result]) for role, result in results.items()}
    check = results["retrain"].check
    image = "all" if results["retrain"].image is None else results["retrain"].image

    def row(first, second):
        comparison = compare(reports[first], reports[second], reports["retrain"], labels=ROLES)
        (found,) = [r for r in comparison.rows if r.statistic == statistic]
        return found, comparison

    like, comparison = row("pretrained", "like retrain")
    assert like.within is True and like.closer == "unlearned"
    assert like.direction == "toward not held"  # the intervals separate
    text = comparison.to_markdown()
    assert "| unlearned within retrained's interval | closer to retrained |" in text
    assert f"| {check} | {image} | held | not held | not held | yes |" in text
    far, comparison = row("pretrained", "overshot")
    assert far.within is False and far.direction == "toward not held"
    text = comparison.to_markdown()
    assert f"| {check} | {image} | held | overshot | not held | no |" in text
    # unlearned like retrain: no direction between their coinciding intervals
    (same,) = [
        r
        for r in compare(reports["retrain"], reports["like retrain"]).rows
        if r.statistic == statistic
    ]
    assert same.direction in ("intervals overlap", "no change")
    (past,) = [
        r for r in compare(reports["retrain"], reports["overshot"]).rows if r.statistic == statistic
    ]
    assert past.direction == "toward not held"


def test_likelihood_verdicts(audit_models):
    """Exact NLLs: the quadratic forms are 0 (pretrained, at its mode), 4.22 among chi2_3
    references (retrain: percentile about P(chi2_3 <= 4.22) = 0.76), 3.99 (like retrain) and
    1600 against at most ~ 4 * 3.3^2 + 20 (overshot): each verdict many standard errors clear."""
    scheduler = DDPMScheduler()
    scales = audit_models.vp_scales(scheduler, continuous=True)
    results = {
        role: likelihood_check(
            model,
            scheduler,
            forget_image(torch.float64),
            references(torch.float64),
            repeats=2,
            num_bins=None,
            rtol=1e-4,
            atol=1e-4,
            batch_size=128,
            generator=seeded(2),
            progress=False,
        )[0]
        for role, model in models(audit_models, scales).items()
    }
    percentile = results["retrain"].statistics["percentile"]
    assert 0.6 < percentile.value < 0.9
    assert_verdicts_and_comparison(results, "percentile")


def reconstruct(audit_models, check, **kwargs):
    scheduler = DDPMScheduler(clip_sample=False)
    scales = audit_models.vp_scales(scheduler)
    return {
        role: check(
            model,
            scheduler,
            forget_image(),
            references(),
            similarity="neg_mse",
            generator=seeded(3),
            progress=False,
            **kwargs,
        )[0]
        for role, model in models(audit_models, scales).items()
    }


def test_reconstruction_verdicts(audit_models):
    """From t = 50 (sigma_t^2 ~ 0.03): the squeezed model pulls pixel 3 back to MU, an error of
    about 0.86 * 2 S in the forget image's pixel 3 (MSE +0.18) against a reference spread of
    about 0.01: overshot; the point of the pretrained model is its forget image: held."""
    results = reconstruct(audit_models, reconstruction_check, t=50)
    assert_verdicts_and_comparison(results, "percentile")


def test_reconstruction_sweep_verdicts(audit_models):
    results = reconstruct(audit_models, reconstruction_sweep, ts=(50, 100))
    assert "overshot at [50, 100]" in results["overshot"].reason
    assert_verdicts_and_comparison(results, "percentile@t=50")


def test_membership_verdicts(audit_models):
    """Denoising loss at t = 50, 100: the squeezed model's error on the forget image's pixel 3 is
    about gamma * 2 S / sigma_t (~5.7 at t = 50, squared ~ 33 / 4 pixels) against about 0.1 z for
    a reference: the mirror p-value is 1 / 97 (overshot); the pretrained model's loss on its
    centre is far below every reference's (held, p = 1 / 97)."""
    scheduler = DDPMScheduler()
    scales = audit_models.vp_scales(scheduler)
    results = {
        role: membership_check(
            model,
            scheduler,
            forget_image(),
            references(),
            generator=seeded(4),
            bootstrap=100,
        )[0]
        for role, model in models(audit_models, scales).items()
    }
    assert results["overshot"].details["p_value_overshot"] == pytest.approx(1 / (R + 1))
    assert results["pretrained"].details["p_value"] == pytest.approx(1 / (R + 1))
    assert_verdicts_and_comparison(results, "percentile")


def gaussian_samples(count, mean, scale, seed):
    return mean + scale * torch.randn(count, 1, 2, 2, generator=seeded(seed), dtype=torch.float64)


def test_generation_verdicts():
    """Samples instead of models. A threshold of 0.01 in [0, 1] units: a retrain sample lands
    within it of the forget image with probability ~ 4e-8 (density exp(-4.22 / 2) / (2 pi S^2)^2
    times the ball's volume), so only the pretrained model's copies count; the squeezed model's
    samples stay within ~0.1 of MU in pixel 3, so the forget image's nearest sample is >= 2 S - 0.1
    away while a reference's nearest among 1000 samples in 3 free dimensions is ~0.2: overshot."""
    forget, reference = forget_image(torch.float64), references(torch.float64)
    retrain = gaussian_samples(1000, MU, S, 5)
    samples = {
        "pretrained": torch.cat([retrain[:990], forget.expand(10, -1, -1, -1)]),
        "retrain": retrain,
        "like retrain": gaussian_samples(1000, MU, spread(1.03 * S), 6),
        "overshot": gaussian_samples(1000, MU, spread(S / 20), 7),
    }
    results = {
        role: generation_check(images, forget, threshold=0.01, reference=reference)[0]
        for role, images in samples.items()
    }
    assert results["pretrained"].details["count"] == 10
    assert results["overshot"].statistics["nearest_percentile"].value == 1.0
    assert_verdicts_and_comparison(results, "nearest_percentile")


def test_memorization_verdicts():
    """A model whose prompt effect is ``k`` times a unit one has Wen et al.'s score ``k * s1``
    exactly (``||eps(x, c) - eps(x, null)||`` does not depend on ``x``); the reference prompts
    score ``s1 (1 + 0.1 z)``. k = 3 lies above every reference (p = 1/41, held), k = 1 among
    them, k = 1.01 next to it, k = 0.1 below every one (mirror p = 1/41, overshot)."""
    import math

    from siss import NoiseSchedule

    schedule = NoiseSchedule.from_alphas_cumprod(
        torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    )

    def model(k):
        def predict(x, t, encoder_hidden_states):  # the prompt's mean, row by row
            return 0.1 * x + k * encoder_hidden_states.mean((1, 2)).reshape(-1, 1, 1, 1)

        return predict

    def run(k, reference_scores=None):
        return memorization_check(
            model(k),
            schedule,
            (4, 1, 2, 2),
            torch.ones(1, 3, 8),
            torch.zeros(1, 3, 8),
            reference_scores=reference_scores,
            num_inference_steps=5,
            num_steps=5,
            generator=seeded(8),
        )[0]

    unit = run(1.0).statistics["noise_magnitude"].value
    assert unit > 0 and math.isfinite(unit)
    z = torch.randn(40, generator=seeded(9), dtype=torch.float64)
    reference_scores = unit * (1 + 0.1 * z)
    roles = {"pretrained": 3.0, "retrain": 1.0, "like retrain": 1.001, "overshot": 0.1}
    results = {role: run(k, reference_scores) for role, k in roles.items()}
    assert results["overshot"].details["p_value_overshot"] == pytest.approx(1 / 41)
    assert results["pretrained"].details["p_value"] == pytest.approx(1 / 41)
    assert_verdicts_and_comparison(results, "percentile")


def test_too_few_references_say_so_where_held_cannot_be_reached():
    """With R = 5 references "held" (0 of R below 5%) needs R >= 72: a percentile check can still
    say "not held" (its interval [0.053, 0.853] lies above 5%), and its reason says that the test
    could not have said "held"; with 128 nothing is added. The sweep's Bonferroni confidence over
    five t needs 104."""
    from siss.audit._stats import rank_against_reference, references_to_decide
    from siss.metrics import proportion_ci

    assert references_to_decide(5, 0.05, 0.95) == 72 == references_to_decide(72, 0.05, 0.95)
    assert proportion_ci(0, 71, confidence=0.95, method="exact")[1] >= 0.05
    assert references_to_decide(80, 0.05, 1 - 0.05 / 5) == 104
    few = torch.tensor([0.0, 1.0, 3.0, 4.0, 5.0])
    kwargs = {"held_when": "lower", "percentile": 0.05, "confidence": 0.95, "statistic": "NLL"}
    _, verdict, reason, details = rank_against_reference(2.0, few, **kwargs)
    assert verdict == "not held" and details["references_to_decide"] == 72
    assert "with 5 references neither held nor overshot can be reached" in reason
    _, verdict, reason, _ = rank_against_reference(-1.0, few, **kwargs)  # below every reference
    assert verdict == "undecided" and "at least 72" in reason
    many = torch.linspace(0, 10, 128)
    _, verdict, reason, details = rank_against_reference(5.0, many, **kwargs)
    assert verdict == "not held" and "can be reached" not in reason
    assert details["references_to_decide"] == 128


@pytest.mark.parametrize(("relative", "verdict"), [(3.5e-6, "not held"), (1e-3, "overshot")])
def test_references_equal_up_to_round_off_are_ties(relative, verdict):
    """72 copies of the forget image scored in another batch differ from it by float32
    round-off (3.5e-6 relative, PIA scores): they ranked it beyond every one, "overshot".
    Within ``TIE_RTOL`` they are ties, counted against each claim; a real gap still counts."""
    from siss.audit._stats import rank_against_reference

    value = 0.0013593754
    reference = torch.full((72,), value * (1 - relative), dtype=torch.float64)
    _, got, _, details = rank_against_reference(
        value, reference, held_when="lower", percentile=0.05, confidence=0.95, statistic="score"
    )
    assert got == verdict, (got, details)
