"""Sequential deletion requests: a resumable queue, a quality band to stop on, and the check that
nothing unlearned comes back.

Deletion requests arrive one at a time, and each is unlearned starting from the previous one's
result (the paper unlearned 50 CelebA-HQ faces this way, 60 steps each). Three things are the
same whatever the model, and live here:

* ``RequestQueue``: the ordered requests, which are done, the metrics recorded after each, and
  why the queue stopped, kept in one JSON file written atomically after every request; reopening
  it with different settings is refused, naming the settings that differ.
* ``QualityBand``: the range a quality score (an FID-style distance, an Inception-style score) of
  the starting model falls in over evaluation seeds; leaving it is the queue's stop rule.
* ``forgetting_flags``: after each request, which already processed requests came back (their
  generation rate's interval no longer contains 0, or their NLL fell back).

The model, its training and its evaluation stay the caller's (``examples/sequential.py`` runs
them for a diffusers DDPM). This module depends on the standard library only; ``QualityBand.
from_evaluations`` reads Student's t quantile from scipy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from siss._files import write_json_atomically
from siss._optional import needs

__all__ = ["QualityBand", "RequestQueue", "forgetting_flags"]


@dataclass(frozen=True)
class QualityBand:
    """A one-sided band for a quality score: where the starting model's score falls.

    The bound is a prediction bound (Student's t) for one new evaluation of the unchanged model:
    ``center + factor * spread`` for a score where lower is better (FID), ``center - factor *
    spread`` where higher is better (IS), with ``factor = t_{level, S-1} * sqrt(1 + 1/S)`` for
    ``S`` evaluations of mean ``center`` and standard deviation ``spread``. An unchanged model
    leaves the band with probability ``1 - level`` per evaluation.

    Attributes:
        metric: the score's name (for messages).
        center: mean of the starting model's scores over evaluation seeds.
        spread: their sample standard deviation (``n - 1``).
        evaluations: how many seeds ``S`` they came from.
        factor: multiple of ``spread`` from ``center`` to the bound.
        higher_is_better: ``True`` for IS-like scores, ``False`` for FID-like ones.

    Examples:
        >>> band = QualityBand("FID", center=20.0, spread=2.0, evaluations=5, factor=3.0,
        ...                    higher_is_better=False)
        >>> band.bound, band.contains(25.0), band.contains(27.0)
        (26.0, True, False)
    """

    metric: str
    center: float
    spread: float
    evaluations: int
    factor: float
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        # a band built by hand is held to what from_evaluations gives: an infinite center or
        # spread made a bound that every score passed
        for name in ("center", "spread", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"`{name}` must be a number, got {value!r}")
            if not math.isfinite(value) or (name != "center" and value < 0):
                rule = "finite" if name == "center" else "finite and >= 0"
                raise ValueError(f"`{name}` must be {rule}, got {value!r}")
        count = self.evaluations
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 2:
            raise ValueError(f"`evaluations` must be an int >= 2 (a spread needs 2), got {count!r}")

    @classmethod
    def from_evaluations(
        cls,
        metric: str,
        values: Sequence[float],
        *,
        level: float = 0.99,
        higher_is_better: bool = False,
    ) -> QualityBand:
        """The band of ``values``, the starting model's scores over ``S >= 2`` evaluation seeds.

        Args:
            metric: the score's name.
            values: ``S >= 2`` finite scores.
            level: one-sided coverage of the prediction bound, in ``(0.5, 1)``.
            higher_is_better: the direction of the score.

        Examples:
            >>> band = QualityBand.from_evaluations("FID", [18.0, 20.0, 22.0], level=0.99)
            >>> round(band.factor, 3), round(band.bound, 2)  # t_{0.99, 2} = 6.965, x sqrt(4/3)
            (8.042, 36.08)
        """
        values = [float(v) for v in values]
        if len(values) < 2:
            raise ValueError(f"`values` needs >= 2 evaluations for a spread, got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"`values` must be finite (not measured scores make no band): {values}"
            )
        if not 0.5 < level < 1.0:
            raise ValueError(f"`level` must be in (0.5, 1), got {level!r}")
        with needs("QualityBand.from_evaluations"):
            from scipy.stats import t as student
        count = len(values)
        center = sum(values) / count
        spread = math.sqrt(sum((v - center) ** 2 for v in values) / (count - 1))
        factor = float(student.ppf(level, count - 1)) * math.sqrt(1 + 1 / count)
        return cls(metric, center, spread, count, factor, higher_is_better)

    @property
    def bound(self) -> float:
        """The worst score inside the band."""
        offset = self.factor * self.spread
        return self.center - offset if self.higher_is_better else self.center + offset

    def contains(self, value: float | None) -> bool:
        """Whether ``value`` is inside the band; a score that was not measured (``None``, NaN)
        is not: a queue cannot vouch for quality it could not measure."""
        if value is None or not math.isfinite(value):
            return False
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def describe(self) -> str:
        """One line: how the bound was computed."""
        side = ">=" if self.higher_is_better else "<="
        sign = "-" if self.higher_is_better else "+"
        return (
            f"{self.metric} {side} {self.bound:.4g} ({self.center:.4g} {sign} {self.factor:.3g} x "
            f"sd {self.spread:.3g} over {self.evaluations} evaluation seeds)"
        )


class RequestQueue:
    """Deletion requests processed in order, each from the previous one's result, resumable.

    The state (requests, settings, one record of metrics per finished request, and the stop
    reason) is one JSON file rewritten atomically by ``complete`` and ``stop``: the caller saves
    the model of request ``i`` first, then calls ``complete``, so a run killed at any moment
    resumes at the first request without a record, from the last recorded request's model.

    Args:
        path: the state file.
        requests: the requests' names, in processing order (distinct).
        config: the settings the results depend on (JSON-serialisable); ``open`` refuses to
            resume under different ones.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "queue.json"
        >>> queue = RequestQueue.open(path, ["a", "b", "c"], {"lr": 1e-4}, resume=False)
        >>> queue.complete({"rate": 0.0})
        >>> queue.done, queue.pending
        (['a'], ['b', 'c'])
        >>> RequestQueue.open(path, ["a", "b", "c"], {"lr": 1e-4}, resume=True).next_request
        'b'
        >>> try:
        ...     RequestQueue.open(path, ["a", "b", "c"], {"lr": 5e-5}, resume=True)
        ... except ValueError as error:
        ...     print(str(error).split(": ", 1)[1].split(";")[0])
        lr (0.0001 there, 5e-05 now)
    """

    def __init__(self, path: str | Path, requests: Sequence[str], config: Mapping[str, Any]):
        names = [str(name) for name in requests]
        if not names:
            raise ValueError("`requests` is empty: a queue needs at least one request")
        if len(set(names)) != len(names):
            raise ValueError(f"`requests` must be distinct names, got {names}")
        self.path = Path(path)
        self.requests = names
        self.config = json.loads(json.dumps(dict(config)))  # as it reads back from the file
        self.records: list[dict[str, Any]] = []
        self.stopped: str | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        requests: Sequence[str],
        config: Mapping[str, Any],
        *,
        resume: bool,
    ) -> RequestQueue:
        """A new queue (``resume=False``: any state at ``path`` is replaced when it is first
        saved), or the one saved at ``path`` (``resume=True``; a new one if there is none).

        Raises:
            ValueError: resuming a queue saved with other requests or settings, naming them.
        """
        queue = cls(path, requests, config)
        if not resume or not queue.path.exists():
            return queue
        saved = json.loads(queue.path.read_text())
        if saved["requests"] != queue.requests:
            raise ValueError(
                f"{queue.path} holds the requests {saved['requests']}, not {queue.requests}"
            )
        keys = sorted(set(saved["config"]) | set(queue.config))
        differ = [  # as JSON text: a NaN setting equals itself
            k for k in keys if _text(saved["config"].get(k)) != _text(queue.config.get(k))
        ]
        if differ:
            pairs = ", ".join(
                f"{k} ({saved['config'].get(k)!r} there, {queue.config.get(k)!r} now)"
                for k in differ
            )
            raise ValueError(
                f"{queue.path} was made with different settings: {pairs}; resume with the same "
                "settings or start a new queue elsewhere"
            )
        queue.records, queue.stopped = saved["records"], saved["stopped"]
        return queue

    @property
    def done(self) -> list[str]:
        """The requests finished, in order."""
        return self.requests[: len(self.records)]

    @property
    def pending(self) -> list[str]:
        """The requests not yet processed, in order (those left when the queue stopped)."""
        return self.requests[len(self.records) :]

    @property
    def next_request(self) -> str | None:
        """The request to process next; ``None`` when all are done or the queue stopped."""
        return None if self.finished else self.pending[0]

    @property
    def finished(self) -> bool:
        """All requests done, or the queue stopped."""
        return self.stopped is not None or not self.pending

    def complete(self, metrics: Mapping[str, Any], *, stop: str | None = None) -> None:
        """Records ``next_request`` as done with ``metrics`` (JSON-serialisable) and saves;
        with ``stop``, the queue stops after it, in the same write (a run killed between a
        ``complete`` and a ``stop`` resumed past a request whose quality had left its band).

        Nothing changes, in memory or on disk, when the record cannot be saved (a numpy or
        torch number among ``metrics``: ``TypeError``).

        Raises:
            ValueError: the queue is finished, or ``metrics`` has a ``"request"`` key (the
                record's own).
        """
        if self.finished:
            raise ValueError(f"the queue is finished ({self.stopped or 'all requests done'})")
        if "request" in metrics:
            raise ValueError("`metrics` has a 'request' key: the record's own (the request name)")
        records = [*self.records, {"request": self.pending[0], **metrics}]
        stopped = self.stopped if stop is None else str(stop)
        self._write(records, stopped)
        self.records, self.stopped = records, stopped

    def stop(self, reason: str) -> None:
        """Stops the queue (its pending requests stay unprocessed) and saves."""
        self._write(self.records, str(reason))
        self.stopped = str(reason)

    def save(self) -> None:
        """Writes the state file atomically (a temporary file and ``os.replace``)."""
        self._write(self.records, self.stopped)

    def _write(self, records: list[dict[str, Any]], stopped: str | None) -> None:
        state = {
            "requests": self.requests,
            "config": self.config,
            "records": records,
            "stopped": stopped,
        }
        write_json_atomically(self.path, state)


def forgetting_flags(
    history: Sequence[Mapping[str, Mapping[str, Any]]],
    requests: Sequence[str],
    *,
    z: float = 1.96,
) -> list[dict[str, list[str]]]:
    """Which processed requests came back after each request.

    ``history[j]`` holds the metrics of every request after request ``j`` was processed:
    ``{name: {"rate_ci95": [low, high], "nll_bpd": float | None, "nll_bpd_se": float | None}}``.
    After request ``j``, request ``i <= j`` is flagged

    * ``"rate"`` when its generation rate's interval excludes 0 (``low > 0``: the model
      generates it again, or still does);
    * ``"rate not measured"`` when that interval is missing or NaN: nothing says the request
      stayed forgotten, so it is never counted as kept;
    * ``"nll"`` for ``i < j`` when its NLL fell below its NLL right after its own request by
      more than ``z`` standard errors of the difference (``sqrt(se_j^2 + se_i^2)``, a missing
      or NaN standard error taken as 0; an NLL that was not measured, ``None`` or NaN, is not
      compared).

    Args:
        history: one mapping per processed request, in order.
        requests: the requests' names, in processing order.
        z: standard errors of the NLL drop that count as falling back (1.96: two-sided 95%).

    Returns:
        ``flags[j] = {name: marks}`` for the flagged requests after request ``j``, ``marks`` a
        subset of ``["rate" or "rate not measured", "nll"]``.

    Examples:
        >>> kept = {"rate_ci95": [0.0, 0.01], "nll_bpd": 9.0, "nll_bpd_se": 0.1}
        >>> back = {"rate_ci95": [0.001, 0.02], "nll_bpd": 6.0, "nll_bpd_se": 0.1}
        >>> after = [{"a": kept, "b": back}, {"a": back, "b": kept}]
        >>> forgetting_flags(after, ["a", "b"])
        [{}, {'a': ['rate', 'nll']}]
    """
    if len(history) > len(requests):
        raise ValueError(f"`history` has {len(history)} entries for {len(requests)} requests")
    flags: list[dict[str, list[str]]] = []
    for j, metrics in enumerate(history):
        found: dict[str, list[str]] = {}
        for i in range(j + 1):
            name = requests[i]
            now, own = metrics[name], history[i][name]
            marks = []
            low = _measured((now.get("rate_ci95") or [None])[0])
            if low is None:
                marks.append("rate not measured")
            elif low > 0:
                marks.append("rate")
            nll, nll_own = _measured(now.get("nll_bpd")), _measured(own.get("nll_bpd"))
            if i < j and nll is not None and nll_own is not None:
                se_now = _measured(now.get("nll_bpd_se")) or 0.0
                se_own = _measured(own.get("nll_bpd_se")) or 0.0
                if nll < nll_own - z * math.hypot(se_now, se_own):
                    marks.append("nll")
            if marks:
                found[name] = marks
        flags.append(found)
    return flags


def _measured(value: Any) -> float | None:
    """``value`` as a float, ``None`` when it was not measured (``None`` or NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
