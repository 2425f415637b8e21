"""Check the losses against their specification (tests/losses/test_spectral_losses.py) and print one line per group.

    python test_spectral_losses.py      # ✓ RMS loss: works ... ✓ Gradients: flow correctly, then the counts;
                                        # exit 1 if any test fails
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

SPECIFICATION = Path(__file__).resolve().parent / "tests" / "losses" / "test_spectral_losses.py"

# One ✓ line per group. A test belongs to the group its name starts with (test_<group>_...) or, for the
# properties shared by every loss, to the group of the loss it is parametrised with.
GROUPS = {"rms": "RMS loss: works", "stft": "STFT loss: works", "mel": "Mel loss: works",
          "combined": "Combined loss: works", "gradients": "Gradients: flow correctly"}


def group_of(nodeid: str) -> str | None:
    name = nodeid.rsplit("::", 1)[-1]
    function, _, params = name.partition("[")
    for group in GROUPS:
        if function.startswith(f"test_{group}_"):
            return group
    return next((group for group in GROUPS if group in params.rstrip("]").split("-")), None)


class _GroupReport:
    """pytest plugin: collects each test's outcome under its group."""

    def __init__(self):
        self.passed = {group: 0 for group in GROUPS}
        self.failures = {group: [] for group in GROUPS}
        self.ungrouped = []

    def pytest_runtest_logreport(self, report):
        group = group_of(report.nodeid)
        if group is None:
            self.ungrouped.append(report.nodeid)
        elif report.failed:
            self.failures[group].append(report)
        elif report.when == "call" and report.passed:
            self.passed[group] += 1


def summary_lines(report: _GroupReport) -> tuple[list[str], bool]:
    """(the lines to print, whether everything passed): a ✓ line per group exactly as the guide gives them,
    or ✗ with the failures, then the test counts on a line of their own."""
    lines, ok = [f"✗ {nodeid}: belongs to no group" for nodeid in sorted(set(report.ungrouped))], not report.ungrouped
    for group, label in GROUPS.items():
        failures = report.failures[group]
        if failures or not report.passed[group]:
            ok = False
            lines += [f"--- {failure.nodeid} ({failure.when})\n{failure.longreprtext}\n" for failure in failures]
            lines.append(f"✗ {label.split(':')[0]}: FAILED ({len(failures)} failing, {report.passed[group]} passing: "
                         f"{', '.join(f.nodeid.rsplit('::', 1)[-1] for f in failures) or 'no test ran'})")
        else:
            lines.append(f"✓ {label}")
    lines.append("(tests passed per group: " + ", ".join(f"{group} {report.passed[group]}" for group in GROUPS) + ")")
    return lines, ok


def main() -> int:
    report, output = _GroupReport(), io.StringIO()
    with contextlib.redirect_stdout(output):      # pytest's own report; this prints one line per group instead
        code = pytest.main([str(SPECIFICATION), "-p", "no:cacheprovider"], plugins=[report])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):   # usage or collection error
        print(output.getvalue())
    lines, ok = summary_lines(report)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
