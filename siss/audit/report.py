"""What an audit reports: statistics with their sample size and interval, per check and image.

Every number an audit prints is an ``Estimate``: a value, a confidence interval, the sample size it
rests on and a ``status`` that says whether it was measured at all. A check that could not measure
(no reference images, NaN samples, a model without text conditioning) reports ``status`` other
than ``"measured"`` and a NaN value with the reason in ``note``; it never reports 0.

Each statistic also says which way means "the model still holds the image" (``held_when``), so
that ``compare(before, after)`` can state the direction of each change without knowing the check.

Each check's verdict (``CheckResult.verdict``) is one of

* ``"held"``: the forget image is more member-like than almost all non-member references (the
  model still holds it);
* ``"overshot"``: the mirror tail, decided by the same interval rule and reference-size rule as
  "held": the image is *less* member-like (less likely, worse reconstructed, a higher loss) than
  almost all non-members; a model that never trained on it would not treat it so, and an auditor
  can tell (the "Streisand" signature);
* ``"not held"``: neither tail (the image sits among the non-members, where a retrained model
  puts it), or past the "held" tail without reaching the "overshot" one;
* ``"undecided"``: the interval reaches the "held" level, or too few references to decide.

``CheckResult.held`` keeps the two-valued reading: ``True`` for "held", ``False`` for "not held"
and "overshot" (the model does not hold the image either way), ``None`` for "undecided".

``compare(before, after, reference)`` puts two audits side by side, states a direction only where
the two intervals separate, and with a ``reference`` audit (a retrained model, or any model) says
per statistic whether ``after``'s value lies within the reference's interval and which of
``before`` and ``after`` is closer to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

Status = Literal["measured", "not measured", "non-finite"]
HeldWhen = Literal["higher", "lower"]
Verdict = Literal["held", "not held", "overshot", "undecided"]
VERDICTS: tuple[Verdict, ...] = ("held", "not held", "overshot", "undecided")
"""The verdicts a check can give (module docstring).

Examples:
    >>> from siss.audit import VERDICTS
    >>> VERDICTS
    ('held', 'not held', 'overshot', 'undecided')
"""

__all__ = [
    "VERDICTS",
    "AuditReport",
    "CheckResult",
    "Comparison",
    "ComparisonRow",
    "Estimate",
    "Verdict",
    "compare",
    "held_of",
]


def held_of(verdict: Verdict) -> bool | None:
    """The two-valued ``held`` of a verdict: ``True`` for "held", ``False`` for "not held" and
    "overshot", ``None`` for "undecided".

    Examples:
        >>> [held_of(v) for v in VERDICTS]
        [True, False, False, None]
    """
    if verdict not in VERDICTS:
        raise ValueError(f"a verdict must be one of {VERDICTS}, got {verdict!r}")
    return {"held": True, "not held": False, "overshot": False, "undecided": None}[verdict]


def _verdict_of(held: bool | None) -> Verdict:
    return {True: "held", False: "not held", None: "undecided"}[held]


@dataclass(frozen=True)
class Estimate:
    """One statistic of an audit.

    Attributes:
        value: the estimate; NaN unless ``status == "measured"``.
        low, high: its confidence interval (``confidence``); NaN where no interval applies, with
            ``note`` saying why.
        n: the sample size it rests on (samples drawn, images scored, noise draws, ...).
        held_when: ``"higher"`` if a larger value means the model holds the image more
            (a generation rate), ``"lower"`` if a smaller one does (an NLL).
        status: ``"measured"``; ``"not measured"`` (the check did not apply or lacked data);
            ``"non-finite"`` (the model produced NaN or inf: a diverged model, never a pass).
        note: how it was measured (the interval's method, the threshold) or why it was not.
        confidence: level of the interval.

    Examples:
        >>> Estimate(0.014, 0.0077, 0.023, 1000, "higher").format()
        '0.014 [0.0077, 0.023] (n=1000)'
        >>> Estimate.missing("no reference images", "lower").format()
        'not measured (no reference images)'
    """

    value: float
    low: float
    high: float
    n: int
    held_when: HeldWhen
    status: Status = "measured"
    note: str = ""
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.held_when not in ("higher", "lower"):
            raise ValueError(f"`held_when` must be 'higher' or 'lower', got {self.held_when!r}")
        if self.status not in ("measured", "not measured", "non-finite"):
            raise ValueError(f"`status` must be a Status, got {self.status!r}")
        if self.status == "measured" and not math.isfinite(self.value):
            raise ValueError("a measured Estimate needs a finite `value`; use status='non-finite'")
        if self.status != "measured" and not math.isnan(self.value):
            raise ValueError(f"an Estimate with status {self.status!r} must have value NaN")

    @classmethod
    def missing(
        cls, why: str, held_when: HeldWhen, *, n: int = 0, status: Status = "not measured"
    ) -> Estimate:
        """An estimate that could not be made, saying ``why``."""
        return cls(math.nan, math.nan, math.nan, n, held_when, status, why)

    @property
    def measured(self) -> bool:
        return self.status == "measured"

    def format(self, digits: int = 3) -> str:
        """``value [low, high] (n=N)``, or the status and its reason."""
        if not self.measured:
            return f"{self.status} ({self.note})" if self.note else self.status
        text = f"{self.value:.{digits}g}"
        if math.isfinite(self.low) and math.isfinite(self.high):
            text += f" [{self.low:.{digits}g}, {self.high:.{digits}g}]"
        return f"{text} (n={self.n})"


@dataclass(frozen=True)
class CheckResult:
    """One check of one forget image (or of the whole forget set, ``image=None``).

    Attributes:
        check: the check's name (``"generation"``, ``"likelihood"``, ``"reconstruction"``,
            ``"membership"``, ``"memorization"``).
        image: index of the forget image, or ``None`` for a set-level result.
        statistics: named estimates, e.g. ``{"rate": ..., "nearest_distance": ...}``.
        held: the check's two-valued verdict, ``True`` (the model holds the image), ``False``
            (it does not: "not held" or "overshot"), or ``None`` when it could not decide (with
            ``reason``).
        reason: the rule behind the verdict (threshold, margin, p-value), in words.
        details: anything else worth keeping (per-sample distances, the threshold used, ...);
            JSON-serialisable.
        verdict: ``"held"``, ``"not held"``, ``"overshot"`` or ``"undecided"`` (module
            docstring); ``None`` when constructing means "read it from ``held``" (an audit saved
            before "overshot" existed). It must agree with ``held`` (``held_of``).

    Examples:
        >>> nll = Estimate(1.93, 1.9, 1.96, 4, "lower", note="Student-t over 4 repeats")
        >>> result = CheckResult("likelihood", 0, {"nll_bpd": nll}, None, "too few references")
        >>> result.statistics["nll_bpd"].format(), result.held, result.verdict
        ('1.93 [1.9, 1.96] (n=4)', None, 'undecided')
        >>> far = CheckResult("likelihood", 0, {"nll_bpd": nll}, False, "", verdict="overshot")
        >>> far.held, far.verdict
        (False, 'overshot')
    """

    check: str
    image: int | None
    statistics: dict[str, Estimate]
    held: bool | None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict | None = None

    def __post_init__(self) -> None:
        if self.held not in (True, False, None):
            raise ValueError(f"`held` must be True, False or None, got {self.held!r}")
        if self.verdict is None:
            object.__setattr__(self, "verdict", _verdict_of(self.held))
        elif held_of(self.verdict) != self.held:
            raise ValueError(
                f"verdict {self.verdict!r} contradicts held={self.held!r} (held_of gives "
                f"{held_of(self.verdict)!r})"
            )


@dataclass
class AuditReport:
    """The audit of one model against its forget images.

    Attributes:
        model: a label for the audited model (a path or a name).
        results: every ``CheckResult``.
        config: what the audit was run with (thresholds, t, sample counts, seed, feature map).

    Examples:
        >>> rate = Estimate(0.014, 0.0077, 0.023, 1000, "higher")
        >>> report = AuditReport(
        ...     "pretrained", [CheckResult("generation", 0, {"rate": rate}, True, "14 of 1000")])
        >>> report.result("generation", image=0).held
        True
        >>> print(report.to_markdown().splitlines()[-1])
        | generation | 0 | rate | 0.014 [0.0077, 0.023] (n=1000) | held |
        >>> AuditReport.from_dict(report.to_dict()) == report  # JSON round trip
        True
    """

    model: str
    results: list[CheckResult]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN stays NaN: ``json.dumps`` writes it as ``NaN``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        """The report ``to_dict`` wrote; a report saved before ``verdict`` existed gets it from
        ``held``."""
        results = [
            CheckResult(
                **{
                    **result,
                    "statistics": {k: Estimate(**v) for k, v in result["statistics"].items()},
                }
            )
            for result in data["results"]
        ]
        return cls(model=data["model"], results=results, config=dict(data.get("config", {})))

    def result(self, check: str, image: int | None = 0) -> CheckResult:
        """The result of ``check`` for ``image``; ``KeyError`` if the audit has none."""
        for result in self.results:
            if result.check == check and result.image == image:
                return result
        raise KeyError(f"no {check!r} result for image {image!r} in the audit of {self.model!r}")

    def to_markdown(self) -> str:
        """One table row per (check, image, statistic); each check's verdict on its first row."""
        lines = [
            f"Audit of `{self.model}`",
            "",
            "| check | image | statistic | estimate | verdict |",
            "|---|---|---|---|---|",
        ]
        for result in self.results:
            verdict = result.verdict
            image = "all" if result.image is None else str(result.image)
            for row, (name, estimate) in enumerate(result.statistics.items()):
                # The verdict is the check's, not each statistic's: printed once per check.
                cell = verdict if row == 0 else ""
                lines.append(
                    f"| {result.check} | {image} | {name} | {estimate.format()} | {cell} |"
                )
        return "\n".join(lines)


Direction = Literal[
    "toward not held", "toward held", "no change", "intervals overlap", "not comparable"
]


class ComparisonRow(NamedTuple):
    """One statistic of ``compare``: its value in each audit and what the comparison says.

    Attributes:
        check, image, statistic: which statistic.
        first: its estimate in the first audit (``None`` when ``compare`` had none).
        second: its estimate in the second audit (the unlearned model, say).
        direction: how ``second`` differs from ``first`` (``compare``).
        reference: its estimate in the reference audit, or ``None`` without one.
        within: ``second``'s value lies within the reference's interval (``None``: no reference,
            a statistic not measured in either, or a reference without an interval).
        closer: the label of whichever of ``first`` and ``second`` has the value nearer the
            reference's, ``"equally"`` on a tie, ``None`` when not comparable.

    Examples:
        >>> from siss.audit import ComparisonRow, Estimate
        >>> row = ComparisonRow("likelihood", 0, "percentile", None,
        ...     Estimate(0.6, 0.5, 0.7, 128, "lower"), "not comparable",
        ...     reference=Estimate(0.58, 0.49, 0.68, 128, "lower"), within=True, closer="after")
        >>> row.within, row.closer
        (True, 'after')
    """

    check: str
    image: int | None
    statistic: str
    first: Estimate | None
    second: Estimate
    direction: Direction
    reference: Estimate | None = None
    within: bool | None = None
    closer: str | None = None


@dataclass(frozen=True)
class Comparison:
    """Audits side by side: per statistic the values, the direction of the change and, with a
    reference audit, whether the second lies within the reference's interval.

    Attributes:
        before, after: the first and second reports, as given to ``compare`` (``before`` may be
            ``None`` when a ``reference`` is given).
        rows: one ``ComparisonRow`` per statistic (those of ``after``'s checks, in order).
        reference: the reference report (a retrained model, say), or ``None``.
        labels: the roles printed as column names, ``(first, second, reference)``.
        verdicts: ``(check, image, first, second, reference)`` verdicts per check and image
            (``None`` where that audit has no such result).

    Examples:
        >>> def nll(value, held):
        ...     stats = {"nll_bpd": Estimate(value, value - 0.1, value + 0.1, 4, "lower")}
        ...     return [CheckResult("likelihood", 0, stats, held)]
        >>> comparison = compare(AuditReport("pretrained", nll(1.2, True)),
        ...                      AuditReport("unlearned", nll(3.4, False)))
        >>> comparison.rows[0].direction  # a higher NLL: the model holds the image less
        'toward not held'
        >>> print(comparison.to_markdown().splitlines()[-1])
        | likelihood | 0 | nll_bpd | 1.2 [1.1, 1.3] (n=4) | 3.4 [3.3, 3.5] (n=4) | toward not held |
    """

    before: AuditReport | None
    after: AuditReport
    rows: list[ComparisonRow]
    reference: AuditReport | None = None
    labels: tuple[str, str, str] = ("before", "after", "reference")
    verdicts: list[tuple[str, int | None, Verdict | None, Verdict | None, Verdict | None]] = field(
        default_factory=list
    )

    def to_markdown(self) -> str:
        """The table: without a reference, one row per statistic with the change; with one, the
        reference's value, whether the second lies within its interval and which is closer,
        then a table of the verdicts."""
        first, second, ref = self.labels
        default = self.labels[:2] == ("before", "after")
        if self.before is None:
            title = f"{second} `{self.after.model}`"
        elif default:
            title = f"`{self.before.model}` → `{self.after.model}`"
        else:
            title = f"{first} `{self.before.model}` vs {second} `{self.after.model}`"
        if self.reference is not None:
            title += f"; reference: {ref} `{self.reference.model}`"
        columns = ["check", "image", "statistic"]
        columns += [first, second, "change"] if self.before is not None else [second]
        if self.reference is not None:
            columns += [ref, f"{second} within {ref}'s interval"]
            columns += [f"closer to {ref}"] if self.before is not None else []
        lines = [title, "", _row(columns), _rule(len(columns))]
        for row in self.rows:
            label = "all" if row.image is None else str(row.image)
            cells = [row.check, label, row.statistic]
            if self.before is not None:
                first_text = row.first.format() if row.first is not None else "absent"
                cells += [first_text, row.second.format(), row.direction]
            else:
                cells += [row.second.format()]
            if self.reference is not None:
                cells += [
                    row.reference.format() if row.reference is not None else "absent",
                    {True: "yes", False: "no", None: "not comparable"}[row.within],
                ]
                if self.before is not None:
                    cells += [row.closer or "not comparable"]
            lines.append(_row(cells))
        if self.reference is not None:
            names = ([first] if self.before is not None else []) + [second, ref]
            lines += ["", _row(["check", "image", *names, f"{second} like {ref}"])]
            lines.append(_rule(len(names) + 3))
            for check, image, a, b, c in self.verdicts:
                cells = [check, "all" if image is None else str(image)]
                cells += [a or "absent"] if self.before is not None else []
                same = "not comparable" if b is None or c is None else "yes" if b == c else "no"
                lines.append(_row([*cells, b or "absent", c or "absent", same]))
        return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(columns: int) -> str:
    return "|" + "---|" * columns


def _bounds(estimate: Estimate) -> tuple[float, float]:
    """The interval, or the value itself where the statistic has none."""
    if math.isfinite(estimate.low) and math.isfinite(estimate.high):
        return estimate.low, estimate.high
    return estimate.value, estimate.value


def _direction(first: Estimate | None, second: Estimate) -> Direction:
    if first is None or not (first.measured and second.measured):
        return "not comparable"
    if second.value == first.value:
        return "no change"
    low1, high1 = _bounds(first)
    low2, high2 = _bounds(second)
    if not (high1 < low2 or high2 < low1):
        return "intervals overlap"
    grew = second.value > first.value
    return "toward held" if grew == (first.held_when == "higher") else "toward not held"


def _within(second: Estimate, reference: Estimate | None) -> bool | None:
    if reference is None or not (second.measured and reference.measured):
        return None
    if not (math.isfinite(reference.low) and math.isfinite(reference.high)):
        return None
    return reference.low <= second.value <= reference.high


def _closer(
    first: Estimate | None, second: Estimate, reference: Estimate | None, labels: tuple[str, ...]
) -> str | None:
    if first is None or reference is None:
        return None
    if not (first.measured and second.measured and reference.measured):
        return None
    one, two = abs(first.value - reference.value), abs(second.value - reference.value)
    return "equally" if one == two else labels[0] if one < two else labels[1]


def compare(
    before: AuditReport | None,
    after: AuditReport,
    reference: AuditReport | None = None,
    *,
    labels: tuple[str, ...] | None = None,
) -> Comparison:
    """Pair the statistics of audits: the change from ``before`` to ``after``, and with a
    ``reference`` audit (a retrained model, or any model) how ``after`` stands against it.

    Direction (``ComparisonRow.direction``): ``"toward held"`` / ``"toward not held"`` only where
    the two intervals separate (``before``'s upper bound below ``after``'s lower bound, or the
    reverse; a statistic without an interval counts as its value); ``"intervals overlap"`` when
    they do not (the change is within the statistics' noise), ``"no change"`` for equal values,
    ``"not comparable"`` when either is not measured or absent (never "no change").

    Against ``reference``: ``within``, whether ``after``'s value lies within the reference's
    interval; ``closer``, which of ``before`` and ``after`` has the value nearer the reference's
    (by distance between values; ``"equally"`` on a tie). The verdicts of each check are listed
    too (``Comparison.verdicts``).

    Args:
        before: the first audit (e.g. the pretrained model), or ``None`` with a ``reference``.
        after: the second audit (e.g. the unlearned model).
        reference: the audit to compare against (e.g. the retrained model).
        labels: the models' roles, printed as column names: ``(first, second)`` or ``(first,
            second, reference)``; default ``("before", "after", "reference")``. Pass roles
            (``("pretrained", "unlearned", "retrained")``) when the two are not before and after.

    Examples:
        >>> def rate(value, low, high, held):
        ...     stats = {"rate": Estimate(value, low, high, 1000, "higher")}
        ...     return [CheckResult("generation", 0, stats, held, "at least one sample")]
        >>> before = AuditReport("pretrained", rate(0.014, 0.0077, 0.023, True))
        >>> after = AuditReport("unlearned", rate(0.0, 0.0, 0.0037, False))
        >>> row = compare(before, after).rows[0]
        >>> row.statistic, row.first.format(), row.second.format(), row.direction
        ('rate', '0.014 [0.0077, 0.023] (n=1000)', '0 [0, 0.0037] (n=1000)', 'toward not held')
        >>> after.result("generation").held, AuditReport.from_dict(after.to_dict()) == after
        (False, True)

        Overlapping intervals state no direction; a retrained model as the reference:

        >>> def pct(value, low, high, verdict):
        ...     stats = {"percentile": Estimate(value, low, high, 128, "lower")}
        ...     return [CheckResult("likelihood", 0, stats, held_of(verdict), "", {}, verdict)]
        >>> unlearned = AuditReport("siss", pct(0.742, 0.657, 0.815, "not held"))
        >>> retrain = AuditReport("retrain", pct(0.602, 0.511, 0.687, "not held"))
        >>> pretrained = AuditReport("pretrained", pct(0.0, 0.0, 0.0284, "held"))
        >>> row = compare(pretrained, unlearned, retrain,
        ...               labels=("pretrained", "unlearned", "retrained")).rows[0]
        >>> row.direction, row.within, row.closer
        ('toward not held', False, 'unlearned')
        >>> compare(retrain, unlearned).rows[0].direction
        'intervals overlap'
    """
    if before is None and reference is None:
        raise ValueError("compare needs `before` or a `reference`")
    given = tuple(labels) if labels is not None else ()
    if labels is not None and (
        len(given) not in (2, 3) or not all(isinstance(x, str) for x in given)
    ):
        raise ValueError(f"`labels` must be 2 or 3 strings (roles), got {labels!r}")
    names = (given + ("before", "after", "reference")[len(given) :])[:3]
    rows: list[ComparisonRow] = []
    verdicts = []
    firsts = {(r.check, r.image): r for r in before.results} if before is not None else {}
    refs = {(r.check, r.image): r for r in reference.results} if reference is not None else {}
    # the first audit's order (as before), then what only the second has
    order = list(firsts) + [
        (r.check, r.image) for r in after.results if (r.check, r.image) not in firsts
    ]
    seconds = {(r.check, r.image): r for r in after.results}
    for key in order:
        one, two, ref = firsts.get(key), seconds.get(key), refs.get(key)
        verdicts.append(
            (key[0], key[1], *(r.verdict if r is not None else None for r in (one, two, ref)))
        )
        statistics = dict.fromkeys(
            [*(one.statistics if one is not None else {}), *(two.statistics if two else {})]
        )
        for name in statistics:
            first = one.statistics.get(name) if one is not None else None
            second = two.statistics.get(name) if two is not None else None
            held_when = (first or second).held_when
            if first is None and before is not None:
                first = Estimate.missing(f"absent from the audit of {before.model}", held_when)
            if second is None:
                second = Estimate.missing(f"absent from the audit of {after.model}", held_when)
            against = ref.statistics.get(name) if ref is not None else None
            if reference is not None and against is None:
                against = Estimate.missing(f"absent from the audit of {reference.model}", held_when)
            rows.append(
                ComparisonRow(
                    key[0],
                    key[1],
                    name,
                    first,
                    second,
                    _direction(first, second),
                    against,
                    _within(second, against),
                    _closer(first, second, against, names),
                )
            )
    return Comparison(before, after, rows, reference, names, verdicts)
