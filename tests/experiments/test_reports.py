"""The claims rule against hand-computed t-tests, and the report files."""

import json
import math

import pytest

from dynasparse.experiments import reports


def _t2_upper(t):
    """P(T > t) for Student's t with 2 degrees of freedom: 1/2 - t / (2 sqrt(2 + t^2))."""
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


def test_welch_against_a_hand_computed_case():
    # a = 1, 2, 3 (mean 2, s^2 = 1), b = 0, 0, 0: t = 2 / sqrt(1/3); Welch's df = n_a - 1 = 2.
    found = reports.welch([1, 2, 3], [0, 0, 0])
    assert found["t"] == pytest.approx(2 * math.sqrt(3), rel=1e-12)
    assert found["df"] == pytest.approx(2.0)
    assert found["p_greater"] == pytest.approx(_t2_upper(2 * math.sqrt(3)), rel=1e-9)
    assert found["p_less"] == pytest.approx(1 - _t2_upper(2 * math.sqrt(3)), rel=1e-9)


def test_claim_greater_verdicts():
    p = _t2_upper(2 * math.sqrt(3))  # 0.0371
    holds = reports.claim_greater("A beats B", [1, 2, 3], [0, 0, 0], a_name="A", b_name="B")
    assert holds.verdict == "holds" and holds.p_value == pytest.approx(p)
    assert "A 2.00 ± 1.00 (n=3) vs B 0.00 ± 0.00 (n=3)" in holds.measured
    assert reports.claim_greater("B beats A", [0, 0, 0], [1, 2, 3]).verdict == "does not hold"
    assert reports.claim_greater("A beats B", [1, 2, 3], [0, 0, 0], alpha=0.01).verdict == "inconclusive"
    assert reports.claim_greater("one seed", [0.9], [0.1]).verdict == "inconclusive"
    # No spread on either side: the difference is exact.
    assert reports.claim_greater("exact", [0.5, 0.5], [0.4, 0.4]).verdict == "holds"
    assert reports.claim_greater("exact", [0.4, 0.4], [0.5, 0.5]).verdict == "does not hold"
    assert reports.claim_greater("equal", [0.5, 0.5], [0.5, 0.5]).verdict == "inconclusive"
    percent = reports.claim_greater("acc", [0.91, 0.92], [0.80, 0.81], scale=100, unit="%")
    assert "91.50 ± 0.71% (n=2)" in percent.measured


def test_claim_equivalent_is_tost():
    # b = 2, 2, 2 against margins: a - (b - 5) and a - (b + 5) give t = +-5 sqrt(3), df 2.
    close = reports.claim_equivalent("close", [1, 2, 3], [2, 2, 2], 5)
    assert close.verdict == "holds" and close.p_value == pytest.approx(_t2_upper(5 * math.sqrt(3)), rel=1e-9)
    assert reports.claim_equivalent("close", [1, 2, 3], [2, 2, 2], 0.1).verdict == "inconclusive"
    assert reports.claim_equivalent("close", [10, 11, 12], [2, 2, 2], 1).verdict == "does not hold"
    with pytest.raises(ValueError, match="margin must be > 0"):
        reports.claim_equivalent("close", [1, 2], [1, 2], 0)


def test_claim_above_is_a_one_sample_t_test():
    above = reports.claim_above("high", [1, 2, 3], 0.0)
    assert above.verdict == "holds" and above.p_value == pytest.approx(_t2_upper(2 * math.sqrt(3)), rel=1e-9)
    assert reports.claim_above("high", [1, 2, 3], 4.0).verdict == "does not hold"
    assert reports.claim_above("high", [1, 2, 3], 1.9).verdict == "inconclusive"
    assert reports.claim_above("high", [0.95, 0.95], 0.9).verdict == "holds"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="a is empty"):
        reports.welch([], [1])
    with pytest.raises(ValueError, match="finite"):
        reports.claim_greater("x", [1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="alpha must be in"):
        reports.claim_greater("x", [1, 2], [1, 2], alpha=1.5)
    with pytest.raises(ValueError, match="verdict must be one of"):
        reports.Claim("x", "y", "maybe")


class _Record:
    def __init__(self, status, method, accuracy):
        self.status, self.method, self.metrics = status, method, {"accuracy": accuracy}


def test_aggregate_groups_done_records():
    records = [_Record("done", "a", 0.5), _Record("done", "a", 0.7), _Record("failed", "a", 0.0),
               _Record("done", "b", 0.9)]
    found = reports.aggregate(records, lambda r: r.method)
    assert list(found) == ["a", "b"]
    assert found["a"]["mean"] == pytest.approx(0.6) and found["a"]["std"] == pytest.approx(math.sqrt(0.02))
    assert found["a"]["n"] == 2 and found["b"] == {"values": [0.9], "mean": 0.9, "std": 0.0, "n": 1}


def test_report_files(tmp_path):
    report = reports.Report("Title")
    report.text("Some *text*.")
    report.table("results", [{"method": "dpf", "accuracy": 0.91234}, {"method": "a|b", "accuracy": math.nan}])
    report.claim(reports.claim_greater("DPF beats one-shot", [1, 2, 3], [0, 0, 0]))
    report.claim(reports.claim_greater("one seed", [1], [0]))
    report.figure("accuracy", reports.plot_lines({"dpf": [(90, 91.0, 0.5), (95, 90.0, 0.7)]}, xlabel="x",
                                                  ylabel="y", title="t", baselines={"dense": 92.0}), "accuracy")
    report.numbers["runs"] = 3
    paths = report.write(tmp_path, "demo")
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# Title\n")
    assert "| DPF beats one-shot |" in markdown and "| **holds** |" in markdown and "| **inconclusive** |" in markdown
    assert "Rule: A claim \"A > B\" holds when a one-sided Welch t-test" in markdown
    assert "| dpf | 0.9123 |" in markdown and "a\\|b" in markdown
    assert "![accuracy](demo-accuracy.png)" in markdown
    saved = json.loads(paths["json"].read_text())
    assert saved["numbers"] == {"runs": 3} and saved["tables"]["results"][1]["accuracy"] is None
    assert [claim["verdict"] for claim in saved["claims"]] == ["holds", "inconclusive"]
    assert paths["accuracy"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="figure name"):
        report.figure("../x", None)
