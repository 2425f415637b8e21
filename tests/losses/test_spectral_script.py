"""`python test_spectral_losses.py` prints the five lines of the guide the suite was built from, exactly."""
from __future__ import annotations

from types import SimpleNamespace

import test_spectral_losses as script

GUIDE_LINES = ["✓ RMS loss: works", "✓ STFT loss: works", "✓ Mel loss: works", "✓ Combined loss: works",
               "✓ Gradients: flow correctly"]


def test_script_prints_the_guide_lines_then_the_counts():
    report = script._GroupReport()
    report.passed.update(rms=22, stft=31, mel=18, combined=12, gradients=9)
    lines, ok = script.summary_lines(report)
    assert ok
    assert lines == GUIDE_LINES + ["(tests passed per group: rms 22, stft 31, mel 18, combined 12, gradients 9)"]


def test_script_reports_a_failing_group_and_fails():
    report = script._GroupReport()
    report.passed.update(rms=22, stft=31, mel=18, combined=12, gradients=9)
    report.failures["mel"].append(SimpleNamespace(nodeid="test_spectral_losses.py::test_mel_x", when="call",
                                                  longreprtext="assert 1 == 2"))
    lines, ok = script.summary_lines(report)
    assert not ok
    assert "✓ Mel loss: works" not in lines and any(line.startswith("✗ Mel loss: FAILED (1 failing") for line in lines)
    assert [line for line in lines if line.startswith("✓")] == [g for g in GUIDE_LINES if "Mel" not in g]
