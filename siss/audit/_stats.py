"""Statistics shared by the audit checks (private): a mean's interval and ranks among references.

Ranking a forget image's statistic among the same statistic on reference (non-member) images:

* ``percentile_among``: the fraction ``k / R`` of reference values on the "not held" side
  of the value, ties counted against "held" (``held_when="lower"``: ``k = #{ref <= value}``;
  ``"higher"``: ``k = #{ref < value}``), with the exact Clopper-Pearson interval of ``k`` out of
  ``R``; values within ``TIE_RTOL`` (relative) count as ties, float32 round-off being no
  difference;
* ``rank_against_reference``: that percentile and a verdict from its interval (the
  likelihood and reconstruction checks, and the generation check's "overshot");
* ``conformal_verdict``: a verdict from the conformal p-value ``(1 + k') / (R + 1)``, ``k'``
  the reference values at least as member-like (the membership and memorization checks).

Both give the third verdict "overshot" by the mirror rule: the same test on the other tail, with
ties again counted against the claim. ``rank_against_reference``: with ``j`` the reference values
at least as *non*-member-like as the image (``"lower"``: ``#{ref >= value}``; ``"higher"``:
``#{ref <= value}``), overshot if the exact interval of ``j / R`` lies below ``p``, exactly as
"held" needs the interval of ``k / R`` below ``p``; with no ties ``j = R - k``, so this is the
percentile's interval lying beyond ``1 - p``. ``conformal_verdict``: overshot if the mirror
p-value ``(1 + j) / (R + 1) <= level``. The reference-size rules are therefore the same for both
tails (72 references for an interval to exclude 5%, 19 for a p-value to reach 0.05).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from siss._optional import needs
from siss.audit.report import Estimate, HeldWhen, Verdict
from siss.metrics.rate import proportion_ci

TIE_RTOL = 1e-5
"""Reference values within this relative distance of the image's count as ties (against each
claim). The same image scored in another batch differs by float32 round-off (3.5e-6 relative
between a batch of 1 and of 72), so that 72 exact copies of the forget image as references
ranked it below every one and called it "overshot"; distinct images' statistics lie much
further apart."""


def at_or_below(reference: Tensor, value: float) -> int:
    """``#{ref <= value}``, a reference within ``TIE_RTOL`` of ``value`` counted as equal."""
    return int((reference <= value + _tie(reference, value)).sum())


def at_or_above(reference: Tensor, value: float) -> int:
    """``#{ref >= value}``, a reference within ``TIE_RTOL`` of ``value`` counted as equal."""
    return int((reference >= value - _tie(reference, value)).sum())


def _tie(reference: Tensor, value: float) -> Tensor:
    return TIE_RTOL * torch.maximum(reference.abs(), torch.full_like(reference, abs(value)))


def t_interval(values: Tensor, confidence: float) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of finite ``values`` (1-D); NaN bounds for one."""
    n = values.numel()
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, math.nan
    scale = float(values.std()) / math.sqrt(n)
    if scale == 0.0:  # identical values: scipy refuses scale 0; the interval is the point
        return mean, mean, mean
    with needs("siss.audit._stats"):
        from scipy.stats import t as student

    low, high = student.interval(confidence, n - 1, loc=mean, scale=scale)
    return mean, float(low), float(high)


def percentile_among(
    value: float, reference: Tensor, held_when: HeldWhen, confidence: float, what: str
) -> tuple[Estimate, int]:
    """Where ``value`` sits among ``reference`` ``(R,)`` (R >= 1), and the count ``k``.

    ``what`` names the reference values in the note and the reason (e.g. "reference images'
    NLLs"). A non-finite reference gives a ``"non-finite"`` estimate and ``k = -1``.
    """
    reference = reference.detach().to("cpu", torch.float64).flatten()
    total = reference.numel()
    bad = int((~torch.isfinite(reference)).sum())
    if bad:
        why = f"{bad} of {total} {what} are NaN or inf (a diverged model?)"
        return Estimate.missing(why, held_when, n=total, status="non-finite"), -1
    if held_when == "lower":
        count, ties = at_or_below(reference, value), "at or below"
    else:
        count, ties = total - at_or_above(reference, value), "below"
    low, high = proportion_ci(count, total, confidence=confidence, method="exact")
    estimate = Estimate(
        count / total,
        low,
        high,
        total,
        held_when,
        note=f"fraction of the {total} {what} {ties} this one (ties count against held); exact "
        "Clopper-Pearson interval",
        confidence=confidence,
    )
    return estimate, count


def references_to_decide(total: int, percentile: float, confidence: float) -> int:
    """The fewest references ``R >= total`` with which a percentile can be "held": ``0`` out of
    ``R`` has its exact upper bound below ``percentile`` (72 at 5% and 95%; 104 at the sweep's
    Bonferroni confidence over five ``t``). ``total`` itself when it is enough."""
    needed = max(total, 1)
    while proportion_ci(0, needed, confidence=confidence, method="exact")[1] >= percentile:
        needed += 1
    return needed


def rank_against_reference(
    value: float,
    reference: Tensor | None,
    *,
    held_when: HeldWhen,
    percentile: float,
    confidence: float,
    statistic: str,
) -> tuple[Estimate, Verdict, str, dict[str, Any]]:
    """Where ``value`` sits among the reference images' values, and the verdict.

    The percentile is ``percentile_among``'s ``k / R`` (ties count against "held"), with
    the exact Clopper-Pearson interval of ``k`` out of ``R``.

    Verdict, with ``p = percentile`` and ``[lo(x), hi(x)]`` the exact interval of ``x`` out of
    ``R``: ``"held"`` if ``hi(k) < p`` (``"lower"``; the percentile's interval lies below
    ``p``) or ``lo(R - k) > 1 - p`` (``"higher"``: above ``1 - p``); ``"overshot"`` if
    ``hi(j) < p`` with ``j`` the references at least as non-member-like (module docstring);
    ``"not held"`` if the percentile's interval lies on the non-held side of ``p`` (resp.
    ``1 - p``) without reaching "overshot"; ``"undecided"`` otherwise.

    Returns:
        ``(estimate, verdict, reason, details)``.
    """
    if reference is None or reference.numel() == 0:
        why = f"no reference images: the {statistic}'s percentile among non-members is not measured"
        return (
            Estimate.missing(why, held_when),
            "undecided",
            f"undecided: {why}",
            {"reference_n": 0},
        )
    reference = reference.detach().to("cpu", torch.float64).flatten()
    total = reference.numel()
    estimate, count = percentile_among(
        value, reference, held_when, confidence, f"reference images' {statistic}"
    )
    if not estimate.measured:
        return estimate, "undecided", f"undecided: {estimate.note}", {"reference_n": total}
    level, side = (percentile, "below") if held_when == "lower" else (1.0 - percentile, "above")
    far = "above" if held_when == "lower" else "below"
    low, high = estimate.low, estimate.high
    # the mirror tail: references at least as non-member-like as the image (ties against it)
    if held_when == "lower":
        mirror = at_or_above(reference, value)
    else:
        mirror = at_or_below(reference, value)
    mirror_high = proportion_ci(mirror, total, confidence=confidence, method="exact")[1]
    rule = (
        f"held if the percentile's {confidence:.0%} interval lies {side} {level:.3g} (the "
        f"image's {statistic} is {side} the non-members' {level:.3g}-quantile); overshot if "
        f"the share of non-members at least as far on the other side ({mirror}/{total}) has "
        f"its interval below {percentile:.3g} (the {statistic} is {far} the non-members' "
        f"{1 - level:.3g}-quantile); not held if the percentile's interval lies on the other "
        f"side of {level:.3g}; undecided if it contains it"
    )
    if held_when == "lower":
        held = True if high < level else False if low > level else None
    else:
        held = True if low > level else False if high < level else None
    verdict: Verdict = (
        "held"
        if held is True
        else "overshot"
        if mirror_high < percentile
        else "not held"
        if held is False
        else "undecided"
    )
    reason = f"{verdict}: percentile {count}/{total} [{low:.3g}, {high:.3g}]; {rule}"
    needed = references_to_decide(total, percentile, confidence)
    if needed > total:
        reason += (
            f"; with {total} references neither held nor overshot can be reached (each needs "
            f"at least {needed}): this test can only say not held or undecided"
        )
    details = {
        "reference_n": total,
        "references_to_decide": needed,
        "reference_quantile": float(torch.quantile(reference, level)),
        "reference_median": float(reference.median()),
        "quantile_level": level,
        "overshot_quantile": float(torch.quantile(reference, 1.0 - level)),
        "overshot_count": mirror,
    }
    return estimate, verdict, reason, details


def conformal_verdict(
    count: int,
    total: int,
    level: float,
    rule: str,
    noun: str,
    mirror: int | None = None,
) -> tuple[float, Verdict, str, float]:
    """``(p_value, verdict, reason, mirror_p_value)`` for the conformal p-value
    ``(1 + count) / (total + 1)``.

    ``count``: reference values at least as member-like as the image's. ``"held"`` if
    ``p <= level``. ``mirror``: reference values at least as *non*-member-like; ``"overshot"``
    if the mirror p-value ``(1 + mirror) / (total + 1) <= level`` (the same test on the other
    tail; NaN without ``mirror``); ``"not held"`` otherwise. ``"undecided"`` with fewer than
    ``1 / level - 1`` references, where no p-value can reach ``level``. ``rule`` states the test,
    ``noun`` names the references ("reference images").

    Examples:
        >>> conformal_verdict(0, 40, 0.05, "rule", "references", mirror=40)[:2]
        (0.024390243902439025, 'held')
        >>> conformal_verdict(40, 40, 0.05, "rule", "references", mirror=0)[1]
        'overshot'
        >>> conformal_verdict(20, 40, 0.05, "rule", "references", mirror=20)[1]
        'not held'
        >>> conformal_verdict(0, 10, 0.05, "rule", "references", mirror=10)[1]
        'undecided'
    """
    p_value = (1 + count) / (total + 1)
    mirror_p = (1 + mirror) / (total + 1) if mirror is not None else math.nan
    minimum = math.ceil(1 / level) - 1  # (1 + 0) / (R + 1) <= level needs R >= 1/level - 1
    if total < minimum:
        reason = (
            f"no verdict: with {total} {noun} the smallest p-value is 1/{total + 1} > "
            f"{level:g}; give at least {minimum}"
        )
        return p_value, "undecided", reason, mirror_p
    if p_value <= level:
        verdict: Verdict = "held"
    elif mirror_p <= level:
        verdict = "overshot"
    else:
        verdict = "not held"
    text = f"{verdict}: {rule}; p = {p_value:.3g}"
    if mirror is not None:
        text += (
            f"; overshot if the mirror p-value (1 + #{noun} at least as non-member-like) / "
            f"(R + 1) <= {level:g}: {mirror_p:.3g}"
        )
    return p_value, verdict, text, mirror_p
