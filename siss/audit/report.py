"""What an audit reports: statistics with their sample size and interval, per check and image.

Every number an audit prints is an ``Estimate``: a value, a confidence interval, the sample size it
rests on and a ``status`` that says whether it was measured at all. A check that could not measure
(no reference images, NaN samples, a model without text conditioning) reports ``status`` other
than ``"measured"`` and a NaN value with the reason in ``note``; it never reports 0.

Each statistic also says which way means "the model still holds the image" (``held_when``), so
that ``compare(before, after)`` can state the direction of each change without knowing the check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["measured", "not measured", "non-finite"]
HeldWhen = Literal["higher", "lower"]

__all__ = ["AuditReport", "CheckResult", "Comparison", "Estimate", "compare"]


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

    Example:
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
        held: the check's verdict, ``True`` (the model holds the image), ``False``, or ``None``
            when it could not decide (with ``reason``).
        reason: the rule behind ``held`` (threshold, margin, p-value), in words.
        details: anything else worth keeping (per-sample distances, the threshold used, ...);
            JSON-serialisable.

    Example:
        >>> nll = Estimate(1.93, 1.9, 1.96, 4, "lower", note="Student-t over 4 repeats")
        >>> result = CheckResult("likelihood", 0, {"nll_bpd": nll}, None, "too few references")
        >>> result.statistics["nll_bpd"].format(), result.held
        ('1.93 [1.9, 1.96] (n=4)', None)
    """

    check: str
    image: int | None
    statistics: dict[str, Estimate]
    held: bool | None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditReport:
    """The audit of one model against its forget images.

    Attributes:
        model: a label for the audited model (a path or a name).
        results: every ``CheckResult``.
        config: what the audit was run with (thresholds, t, sample counts, seed, feature map).

    Example:
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
            "| check | image | statistic | estimate | held? |",
            "|---|---|---|---|---|",
        ]
        for result in self.results:
            verdict = {True: "held", False: "not held", None: "undecided"}[result.held]
            image = "all" if result.image is None else str(result.image)
            for row, (name, estimate) in enumerate(result.statistics.items()):
                # The verdict is the check's, not each statistic's: printed once per check.
                cell = verdict if row == 0 else ""
                lines.append(
                    f"| {result.check} | {image} | {name} | {estimate.format()} | {cell} |"
                )
        return "\n".join(lines)


Direction = Literal["toward not held", "toward held", "no change", "not comparable"]


@dataclass(frozen=True)
class Comparison:
    """Two audits side by side: per statistic, before, after and the direction of the change.

    Attributes:
        before, after: the two reports, as given to ``compare``.
        rows: ``(check, image, statistic, before, after, direction)`` per statistic of
            ``before``; ``direction`` is ``"toward not held"``, ``"toward held"``,
            ``"no change"`` or ``"not comparable"``.

    Example:
        >>> def nll(value, held):
        ...     stats = {"nll_bpd": Estimate(value, value - 0.1, value + 0.1, 4, "lower")}
        ...     return [CheckResult("likelihood", 0, stats, held)]
        >>> comparison = compare(AuditReport("pretrained", nll(1.2, True)),
        ...                      AuditReport("unlearned", nll(3.4, False)))
        >>> check, image, statistic, before, after, direction = comparison.rows[0]
        >>> direction  # a higher NLL: the model holds the image less
        'toward not held'
        >>> print(comparison.to_markdown().splitlines()[-1])
        | likelihood | 0 | nll_bpd | 1.2 [1.1, 1.3] (n=4) | 3.4 [3.3, 3.5] (n=4) | toward not held |
    """

    before: AuditReport
    after: AuditReport
    rows: list[tuple[str, int | None, str, Estimate, Estimate, Direction]]

    def to_markdown(self) -> str:
        lines = [
            f"`{self.before.model}` → `{self.after.model}`",
            "",
            "| check | image | statistic | before | after | change |",
            "|---|---|---|---|---|---|",
        ]
        for check, image, name, first, second, direction in self.rows:
            label = "all" if image is None else str(image)
            lines.append(
                f"| {check} | {label} | {name} | {first.format()} | {second.format()} "
                f"| {direction} |"
            )
        return "\n".join(lines)


def _direction(first: Estimate, second: Estimate) -> Direction:
    if not (first.measured and second.measured):
        return "not comparable"
    if second.value == first.value:
        return "no change"
    grew = second.value > first.value
    return "toward held" if grew == (first.held_when == "higher") else "toward not held"


def compare(before: AuditReport, after: AuditReport) -> Comparison:
    """Pair the statistics of two audits and say which way each moved.

    A statistic present in only one report, or not measured in either, is ``"not comparable"``
    (never "no change").

    Example:
        >>> def rate(value, high, held):
        ...     stats = {"rate": Estimate(value, 0.0, high, 1000, "higher")}
        ...     return [CheckResult("generation", 0, stats, held, "at least one sample")]
        >>> before = AuditReport("pretrained", rate(0.014, 0.023, True))
        >>> after = AuditReport("unlearned", rate(0.0, 0.0037, False))
        >>> check, image, name, first, second, direction = compare(before, after).rows[0]
        >>> name, first.format(), second.format(), direction
        ('rate', '0.014 [0, 0.023] (n=1000)', '0 [0, 0.0037] (n=1000)', 'toward not held')
        >>> after.result("generation").held, AuditReport.from_dict(after.to_dict()) == after
        (False, True)
    """
    rows = []
    index = {(r.check, r.image): r for r in after.results}
    for result in before.results:
        other = index.get((result.check, result.image))
        for name, first in result.statistics.items():
            second = other.statistics.get(name) if other is not None else None
            if second is None:
                second = Estimate.missing("absent from the second audit", first.held_when)
            rows.append(
                (result.check, result.image, name, first, second, _direction(first, second))
            )
    return Comparison(before, after, rows)
