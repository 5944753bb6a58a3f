"""Statistics shared by the audit checks (private): a mean's interval and ranks among references.

Ranking a forget image's statistic among the same statistic on reference (non-member) images:

* ``percentile_among``: the fraction ``k / R`` of reference values on the "not held" side
  of the value, ties counted against "held" (``held_when="lower"``: ``k = #{ref <= value}``;
  ``"higher"``: ``k = #{ref < value}``), with the exact Clopper-Pearson interval of ``k`` out of
  ``R``;
* ``rank_against_reference``: that percentile and a verdict from its interval (the
  likelihood and reconstruction checks);
* ``conformal_verdict``: a verdict from the conformal p-value ``(1 + k') / (R + 1)``, ``k'``
  the reference values at least as member-like (the membership and memorization checks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from siss.audit.report import Estimate, HeldWhen
from siss.metrics.rate import proportion_ci


def t_interval(values: Tensor, confidence: float) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of finite ``values`` (1-D); NaN bounds for one."""
    n = values.numel()
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t as student

    half = float(student.ppf(0.5 + confidence / 2, n - 1)) * float(values.std()) / math.sqrt(n)
    return mean, mean - half, mean + half


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
        count, ties = int((reference <= value).sum()), "at or below"
    else:
        count, ties = int((reference < value).sum()), "below"
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


def rank_against_reference(
    value: float,
    reference: Tensor | None,
    *,
    held_when: HeldWhen,
    percentile: float,
    confidence: float,
    statistic: str,
) -> tuple[Estimate, bool | None, str, dict[str, Any]]:
    """Where ``value`` sits among the reference images' values, and the verdict.

    The percentile is ``percentile_among``'s ``k / R`` (ties count against "held"), with
    the exact Clopper-Pearson interval of ``k`` out of ``R``.

    Verdict: ``"lower"``: held if the interval lies below ``percentile``, not held if above;
    ``"higher"``: held if it lies above ``1 - percentile``, not held if below; else ``None``.

    Returns:
        ``(estimate, held, reason, details)``.
    """
    if reference is None or reference.numel() == 0:
        why = f"no reference images: the {statistic}'s percentile among non-members is not measured"
        return Estimate.missing(why, held_when), None, f"undecided: {why}", {"reference_n": 0}
    reference = reference.detach().to("cpu", torch.float64).flatten()
    total = reference.numel()
    estimate, count = percentile_among(
        value, reference, held_when, confidence, f"reference images' {statistic}"
    )
    if not estimate.measured:
        return estimate, None, f"undecided: {estimate.note}", {"reference_n": total}
    level, side = (percentile, "below") if held_when == "lower" else (1.0 - percentile, "above")
    low, high = estimate.low, estimate.high
    rule = (
        f"held if the percentile's {confidence:.0%} interval lies {side} {level:.3g} (the "
        f"image's {statistic} is {side} the non-members' {level:.3g}-quantile), not held if it "
        "lies on the other side, undecided if it contains it"
    )
    if held_when == "lower":
        held = True if high < level else False if low > level else None
    else:
        held = True if low > level else False if high < level else None
    verdict = {True: "held", False: "not held", None: "undecided"}[held]
    reason = f"{verdict}: percentile {count}/{total} [{low:.3g}, {high:.3g}]; {rule}"
    details = {
        "reference_n": total,
        "reference_quantile": float(torch.quantile(reference, level)),
        "reference_median": float(reference.median()),
        "quantile_level": level,
    }
    return estimate, held, reason, details


def conformal_verdict(
    count: int, total: int, level: float, rule: str, noun: str
) -> tuple[float, bool | None, str]:
    """``(p_value, held, reason)`` for the conformal p-value ``(1 + count) / (total + 1)``.

    ``count``: reference values at least as member-like as the image's. Held if ``p <= level``;
    no verdict (``None``) with fewer than ``1 / level - 1`` references, where no p-value can
    reach ``level``. ``rule`` states the test, ``noun`` names the references ("reference
    images").
    """
    p_value = (1 + count) / (total + 1)
    minimum = math.ceil(1 / level) - 1  # (1 + 0) / (R + 1) <= level needs R >= 1/level - 1
    if total < minimum:
        reason = (
            f"no verdict: with {total} {noun} the smallest p-value is 1/{total + 1} > "
            f"{level:g}; give at least {minimum}"
        )
        return p_value, None, reason
    return p_value, p_value <= level, f"{rule}; p = {p_value:.3g}"
