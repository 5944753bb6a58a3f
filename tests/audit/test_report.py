"""The audit's result types: statistics that say whether they were measured, and comparisons."""

import json
import math

import pytest

from siss.audit import AuditReport, CheckResult, Estimate, compare


def rate(value, n=1000):
    return Estimate(value, max(value - 0.01, 0.0), value + 0.01, n, "higher", note="exact")


def report(model, rate_value, nll):
    return AuditReport(
        model,
        [
            CheckResult("generation", 0, {"rate": rate(rate_value)}, rate_value > 0, "count >= 1"),
            CheckResult("likelihood", 0, {"nll": nll}, None),
        ],
        {"seed": 0},
    )


def test_unmeasured_estimates_are_nan_and_say_why():
    missing = Estimate.missing("no reference images", "lower")
    assert math.isnan(missing.value) and not missing.measured
    assert missing.format() == "not measured (no reference images)"
    with pytest.raises(ValueError, match="`value`"):
        Estimate(math.nan, 0.0, 1.0, 10, "higher")  # a NaN is never "measured"
    with pytest.raises(ValueError, match="NaN"):
        Estimate(0.0, 0.0, 0.0, 10, "higher", status="non-finite")  # nor a 0 "not measured"
    with pytest.raises(ValueError, match="`held_when`"):
        Estimate(1.0, 0.0, 2.0, 10, "up")


def test_round_trip_through_json():
    first = report("pretrained", 0.009, Estimate(2.9, 2.8, 3.0, 1, "lower"))
    text = json.dumps(first.to_dict())
    again = AuditReport.from_dict(json.loads(text))
    assert again == first
    assert again.result("generation").statistics["rate"].n == 1000
    with pytest.raises(KeyError, match="membership"):
        again.result("membership")


def test_markdown_shows_every_statistic_with_its_status():
    text = report("m", 0.0, Estimate.missing("flow NLL not implemented", "lower")).to_markdown()
    assert "| generation | 0 | rate | 0 [0, 0.01] (n=1000) | not held |" in text
    assert "not measured (flow NLL not implemented)" in text and "undecided" in text


def test_compare_states_the_direction_of_each_change():
    before = report("pretrained", 0.03, Estimate(2.9, 2.8, 3.0, 1, "lower"))
    after = report("siss", 0.0, Estimate(9.8, 9.6, 10.0, 1, "lower"))
    rows = {(r[0], r[2]): r[5] for r in compare(before, after).rows}
    assert rows == {
        ("generation", "rate"): "toward not held",
        ("likelihood", "nll"): "toward not held",
    }
    back = {(r[0], r[2]): r[5] for r in compare(after, before).rows}
    assert set(back.values()) == {"toward held"}
    unmeasured = report("x", 0.0, Estimate.missing("diverged", "lower", status="non-finite"))
    rows = {(r[0], r[2]): r[5] for r in compare(before, unmeasured).rows}
    assert rows[("likelihood", "nll")] == "not comparable"  # never "no change"
    assert "| toward not held |" in compare(before, after).to_markdown()


def test_a_direction_is_stated_only_where_the_intervals_separate():
    """docs/audit.md's sweep at t = 750: pretrained 0.383 [0.274, 0.5] and retrain 0.375
    [0.267, 0.492] coincide: no direction (it used to say "toward not held")."""

    def sweep(value, low, high):
        stats = {"percentile@t=750": Estimate(value, low, high, 128, "higher")}
        return AuditReport("m", [CheckResult("reconstruction_sweep", 0, stats, False)])

    (row,) = compare(sweep(0.383, 0.274, 0.5), sweep(0.375, 0.267, 0.492)).rows
    assert row.direction == "intervals overlap"
    (row,) = compare(sweep(1.0, 0.959, 1.0), sweep(0.547, 0.43, 0.661)).rows
    assert row.direction == "toward not held"
    # a statistic without an interval counts as its value
    point = Estimate(0.637, math.nan, math.nan, 1000, "lower")
    far = Estimate(6.8, math.nan, math.nan, 1000, "lower")
    both = [AuditReport(m, [CheckResult("generation", 0, {"d": e}, None)]) for m, e in
            (("a", point), ("b", far))]  # fmt: skip
    assert compare(*both).rows[0].direction == "toward not held"


def test_the_verdict_has_three_values_and_old_reports_read_back():
    nll = {"percentile": Estimate(1.0, 0.97, 1.0, 128, "lower")}
    overshot = CheckResult("likelihood", 0, nll, False, "far", verdict="overshot")
    saved = AuditReport("m", [overshot]).to_dict()
    again = AuditReport.from_dict(json.loads(json.dumps(saved)))
    assert again.results[0].verdict == "overshot" and again.results[0].held is False
    assert "| likelihood | 0 | percentile | 1 [0.97, 1] (n=128) | overshot |" in (
        again.to_markdown()
    )
    del saved["results"][0]["verdict"]  # an audit.json written before "overshot" existed
    old = AuditReport.from_dict(saved).results[0]
    assert (old.held, old.verdict) == (False, "not held")
    with pytest.raises(ValueError, match="contradicts"):
        CheckResult("likelihood", 0, nll, True, verdict="overshot")
    with pytest.raises(ValueError, match="verdict"):
        CheckResult("likelihood", 0, nll, False, verdict="gone")


def test_compare_with_a_reference_model_labels_the_roles():
    """The issue's numbers: the demo's likelihood percentile 0.742 [0.657, 0.815] against
    retrain's 0.602 [0.511, 0.687] (pretrained 0 [0, 0.0284])."""

    def audit(model, value, low, high, verdict):
        stats = {"percentile": Estimate(value, low, high, 128, "lower")}
        held = {"held": True, "not held": False, "overshot": False}[verdict]
        return AuditReport(model, [CheckResult("likelihood", 0, stats, held, verdict=verdict)])

    pretrained = audit("pre", 0.0, 0.0, 0.0284, "held")
    unlearned = audit("siss", 0.742, 0.657, 0.815, "not held")
    retrained = audit("re", 0.602, 0.511, 0.687, "not held")
    comparison = compare(pretrained, unlearned, retrained, labels=("pretrained", "unlearned",
                                                                   "retrained"))  # fmt: skip
    (row,) = comparison.rows
    assert (row.within, row.closer, row.direction) == (False, "unlearned", "toward not held")
    text = comparison.to_markdown()
    assert text.splitlines()[0] == "pretrained `pre` vs unlearned `siss`; reference: retrained `re`"
    assert "| before |" not in text and "| retrained | unlearned within retrained's interval |" in (
        text
    )
    assert "| likelihood | 0 | held | not held | not held | yes |" in text
    alone = compare(None, unlearned, retrained, labels=("", "unlearned", "retrained"))
    assert alone.rows[0].closer is None and alone.rows[0].within is False
    assert "| check | image | statistic | unlearned | retrained |" in alone.to_markdown()
    with pytest.raises(ValueError, match="reference"):
        compare(None, unlearned)


def test_figure_of_many_forget_images_counts_them_and_shows_the_set_statistics():
    """A member set as forget images (the membership AUC): the first four drawn one by one, the
    held count of all of them in the title, their values as a histogram over the reference's,
    and the set-level AUC with its interval in the verdict text."""
    from siss.audit.figure import MAX_SHOWN, audit_figure

    reference = [0.1 + 0.01 * k for k in range(20)]
    results = [
        CheckResult(
            "membership",
            i,
            {
                "error": Estimate(0.05 + 0.01 * i, math.nan, math.nan, 1, "lower"),
                "percentile": Estimate(0.0 if i < 3 else 0.5, 0.0, 0.6, 20, "lower"),
            },
            i < 3,
            "p-value",
            {"reference_values": reference},
        )
        for i in range(10)
    ]
    auc = Estimate(0.9, 0.8, 0.97, 30, "higher")
    tpr = Estimate.missing("needs 100 non-members", "higher", n=30)
    results.append(CheckResult("membership", None, {"auc": auc, "tpr_at_fpr": tpr}, True, "auc"))
    fig = audit_figure(AuditReport("m", results, {"data_range": [-1.0, 1.0]}))
    titles = {ax.get_title(): ax for ax in fig.axes}
    rank = next(ax for title, ax in titles.items() if title.startswith("rank among"))
    assert "first 4 shown; 3 of 10 images held" in rank.get_title()
    assert len(rank.get_yticks()) == MAX_SHOWN
    histogram = titles["membership: 20 reference values; 3 of 10 images held"]
    assert histogram.get_legend_handles_labels()[1] == ["10 forget images"]
    assert not histogram.get_lines()  # one histogram, not ten lines
    text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "membership (set): held; auc 0.9 [0.8, 0.97] (n=30)" in text
    assert "tpr_at_fpr: not measured" in text and "needs 100 non-members" in text
