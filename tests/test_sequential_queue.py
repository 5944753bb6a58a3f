"""siss.sequential: the quality band, the resumable request queue, the forgetting flags."""

import json
import math

import pytest
from scipy.stats import t as student

from siss.sequential import QualityBand, RequestQueue, forgetting_flags


def test_band_is_the_student_t_prediction_bound():
    values = [18.0, 21.5, 15.0, 23.1, 19.2]
    band = QualityBand.from_evaluations("FID", values, level=0.95)
    mean = sum(values) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    expected = mean + student.ppf(0.95, 4) * sd * math.sqrt(1 + 1 / 5)
    assert band.bound == pytest.approx(expected, rel=1e-12)
    assert band.contains(expected - 1e-9) and not band.contains(expected + 1e-6)
    score = QualityBand.from_evaluations("IS", [9.4, 9.5, 9.3], higher_is_better=True)
    assert score.bound < 9.3 and score.contains(9.4) and not score.contains(score.bound - 1e-6)
    # Not measured is not inside: a queue cannot vouch for what it did not measure.
    assert not band.contains(None) and not band.contains(float("nan"))
    assert "over 5 evaluation seeds" in band.describe()


@pytest.mark.parametrize(
    ("values", "level", "match"),
    [([1.0], 0.99, "values"), ([1.0, float("nan")], 0.99, "finite"), ([1.0, 2.0], 1.0, "level")],
)
def test_band_rejects_bad_input(values, level, match):
    with pytest.raises(ValueError, match=match):
        QualityBand.from_evaluations("FID", values, level=level)


def test_queue_saves_after_each_request_and_resumes(tmp_path):
    path = tmp_path / "queue.json"
    queue = RequestQueue.open(path, ["a", "b", "c"], {"--lr": 1e-4}, resume=False)
    assert queue.next_request == "a" and not path.exists()
    queue.complete({"fid": 20.0})
    assert json.loads(path.read_text())["records"] == [{"request": "a", "fid": 20.0}]
    again = RequestQueue.open(path, ["a", "b", "c"], {"--lr": 1e-4}, resume=True)
    assert again.done == ["a"] and again.pending == ["b", "c"] and again.next_request == "b"
    again.stop("quality left its band")
    stopped = RequestQueue.open(path, ["a", "b", "c"], {"--lr": 1e-4}, resume=True)
    assert stopped.finished and stopped.next_request is None and stopped.pending == ["b", "c"]
    with pytest.raises(ValueError, match="finished"):
        stopped.complete({})
    fresh = RequestQueue.open(path, ["a", "b", "c"], {"--lr": 1e-4}, resume=False)
    assert fresh.records == [] and fresh.stopped is None
    assert [p.name for p in tmp_path.iterdir()] == ["queue.json"]  # no temporary files left


def test_queue_refuses_a_resume_with_other_settings_or_requests(tmp_path):
    path = tmp_path / "queue.json"
    RequestQueue.open(path, ["a", "b"], {"--lam": 0.5, "--seed": 0}, resume=False).save()
    with pytest.raises(ValueError, match=r"--lam \(0.5 there, 1.0 now\), --steps \(None there"):
        RequestQueue.open(path, ["a", "b"], {"--lam": 1.0, "--seed": 0, "--steps": 3}, resume=True)
    with pytest.raises(ValueError, match="holds the requests"):
        RequestQueue.open(path, ["b", "a"], {"--lam": 0.5, "--seed": 0}, resume=True)
    with pytest.raises(ValueError, match="distinct"):
        RequestQueue(path, ["a", "a"], {})
    with pytest.raises(ValueError, match="empty"):
        RequestQueue(path, [], {})


def _shape(low, nll, se=0.1):
    return {"rate_ci95": [low, 0.01], "nll_bpd": nll, "nll_bpd_se": se}


def test_forgetting_flags():
    history = [
        # b and c still waiting (still training data): never flagged
        {"a": _shape(0.0, 9.0), "b": _shape(0.002, 3.0), "c": _shape(0.01, 3.0)},
        # a down 0.2 < 1.96 * sqrt(2) * 0.1 = 0.277: kept
        {"a": _shape(0.0, 8.8), "b": _shape(0.0, 8.0), "c": _shape(0.01, 3.0)},
        # a down 0.4 > 0.277: fell back; b's rate interval excludes 0 again
        {"a": _shape(0.0, 8.6), "b": _shape(0.001, 8.5), "c": _shape(0.0, 9.0)},
    ]
    flags = forgetting_flags(history, ["a", "b", "c"])
    assert flags == [{}, {}, {"a": ["nll"], "b": ["rate"]}]
    # An NLL that was not measured is not compared (neither flagged nor vouched for).
    history[2]["a"]["nll_bpd"] = None
    assert forgetting_flags(history, ["a", "b", "c"])[2] == {"b": ["rate"]}
    # A request whose own rate interval still excludes 0 is flagged at once.
    assert forgetting_flags([{"a": _shape(0.001, 9.0)}], ["a"]) == [{"a": ["rate"]}]
    with pytest.raises(ValueError, match="history"):
        forgetting_flags(history, ["a", "b"])


def test_a_record_that_cannot_be_saved_changes_nothing(tmp_path):
    """A numpy number among the metrics: the save failed after the record was appended, so
    memory was ahead of the file and every later save (``stop`` included) failed too."""
    import numpy as np

    queue = RequestQueue.open(tmp_path / "q.json", ["a", "b"], {}, resume=False)
    with pytest.raises(TypeError):
        queue.complete({"fid": np.float32(20.0)})
    assert queue.done == [] and not (tmp_path / "q.json").exists()
    queue.stop("by hand")
    assert json.loads((tmp_path / "q.json").read_text())["stopped"] == "by hand"
    with pytest.raises(ValueError, match="'request' key"):
        RequestQueue.open(tmp_path / "r.json", ["a"], {}, resume=False).complete({"request": "x"})


def test_a_stop_saved_with_its_record_survives_a_kill(tmp_path):
    """``complete`` then ``stop`` were two writes: a run killed between them resumed at the
    next request from a model whose quality had left the band."""
    path = tmp_path / "q.json"
    queue = RequestQueue.open(path, ["a", "b"], {"lr": 1e-4}, resume=False)
    queue.complete({"fid": 1000.0}, stop="FID outside its band")
    again = RequestQueue.open(path, ["a", "b"], {"lr": 1e-4}, resume=True)
    assert again.finished and again.next_request is None and again.pending == ["b"]
    assert again.stopped == "FID outside its band"


def test_a_nan_setting_resumes():
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "q.json"
    RequestQueue.open(path, ["a"], {"max_grad_norm": math.nan}, resume=False).save()
    assert RequestQueue.open(path, ["a"], {"max_grad_norm": math.nan}, resume=True).pending == ["a"]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("center", math.inf, "`center`"),
        ("spread", math.inf, "`spread`"),
        ("spread", -5.0, "`spread`"),
        ("factor", math.nan, "`factor`"),
        ("evaluations", 0, "`evaluations`"),
    ],
)
def test_a_band_built_by_hand_is_checked(field, value, error):
    """An infinite center or spread made a bound every score passed."""
    fields = {"center": 20.0, "spread": 2.0, "evaluations": 5, "factor": 3.0, field: value}
    with pytest.raises(ValueError, match=error):
        QualityBand("FID", **fields)


def test_an_unmeasured_rate_is_flagged_and_a_nan_error_is_no_error():
    kept = {"rate_ci95": [0.0, 0.01], "nll_bpd": 9.0, "nll_bpd_se": 0.1}
    unmeasured = {"rate_ci95": [math.nan, math.nan], "nll_bpd": 9.0, "nll_bpd_se": 0.1}
    fell = {"rate_ci95": [0.0, 0.01], "nll_bpd": 8.5, "nll_bpd_se": math.nan}
    flags = forgetting_flags([{"a": kept, "b": kept}, {"a": fell, "b": unmeasured}], ["a", "b"])
    # a NaN standard error is taken as the missing one (0), not as "never flagged"
    assert flags == [{}, {"a": ["nll"], "b": ["rate not measured"]}]
