"""The listening test's results: TEST_DIR/report/ratings.{md,csv}, the study's report and MLflow metrics.

    ratings.csv   one row per condition: its mean, 95% CI and n, its cell's pooled figures and the cell's
                  Wilcoxon p against the best cell (ratings.py defines them)
    ratings.md    the screening line and the table per cell
For a test rendered from an ablate.py study, the study's report (OUT_DIR/report/results.{md,csv,png}) is
rewritten from the rows ablate.py saved (report.json) with a listening column, a listening panel in the plot,
and MLflow metrics: on the study's parent run listening_mean_<cell>, listening_ci95_<cell>,
listening_wilcoxon_p_<cell> (and listening_raters, listening_raters_dropped, listening_ratings); on each
rated run listening_mean, listening_ci95, listening_n, listening_wilcoxon_p (its cell's) and
listening_seed_mean (its own condition's). The step of every metric is the number of ratings used, so a
report after more ratings adds a point rather than overwriting one.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from music_continuation.study.ratings import (
    MODEL,
    StudyError,
    Test,
    fmt,
    markdown_table,
    read_ratings,
    screening_line,
    summarise,
)

REPORT_DIR = "report"
ROWS_FILE = "report_rows.json"   # in OUT_DIR: what ablate.py's report was written from (ablate.REPORT_ROWS)


def listening_summary(test_dir) -> tuple[Test, dict]:
    """(the test, its statistics); StudyError for a bad folder or ratings of another version of the test."""
    test = Test.load(test_dir)
    return test, summarise(test, read_ratings(test))


def study_listening(out_dir: Path) -> dict | None:
    """The statistics of the study's test (OUT_DIR/listening), for ablate.py's report; None without one or
    without ratings; StudyError for ratings of a test whose conditions changed."""
    from .render import DEFAULT_TEST_DIR
    folder = Path(out_dir) / DEFAULT_TEST_DIR
    if not (folder / "test.json").is_file():
        return None
    test, summary = listening_summary(folder)
    if not summary["ratings"] and not summary["dropped"]:
        return None
    summary["test_dir"] = str(test.folder)
    summary["runs"] = {c["name"]: c for c in test.conditions}
    return summary


def write_ratings_report(test: Test, summary: dict) -> str:
    """TEST_DIR/report/ratings.csv and ratings.md; returns the Markdown."""
    import pandas as pd

    from music_continuation.utils import atomic_path
    folder = test.folder / REPORT_DIR
    folder.mkdir(exist_ok=True)
    records = []
    for condition in test.conditions:
        own = summary["conditions"][condition["name"]]
        group = summary["cells"][condition["cell"] if condition["kind"] == MODEL else condition["name"]]
        records.append({"condition": condition["name"], "kind": condition["kind"], "cell": condition["cell"] or "",
                        "seed": condition["seed"], "run_id": condition["run_id"] or "", "n": own["n"],
                        "mean": own["mean"], "ci95": own["ci95"], "cell_n": group["n"], "cell_mean": group["mean"],
                        "cell_ci95": group["ci95"], "wilcoxon_p_vs_best": group["wilcoxon_p"],
                        "pairs_with_best": group["pairs"],
                        "best": condition["kind"] == MODEL and condition["cell"] == summary["best"]})
    with atomic_path(folder / "ratings.csv") as tmp:
        pd.DataFrame.from_records(records).to_csv(tmp, index=False, na_rep="")
    lines = [f"# {test.public['title']}", "",
             f"Test {test.hash} in {test.folder}: {len(test.trial_ids)} trials, {len(test.conditions)} conditions, "
             f"{summary['ratings']} ratings used.", "", screening_line(summary), "", LEGEND, "",
             *markdown_table(summary)]
    markdown = "\n".join(lines) + "\n"
    with atomic_path(folder / "ratings.md") as tmp:
        tmp.write_text(markdown)
    return markdown


LEGEND = ("MUSHRA ratings (0-100) over raters x trials after the post-screening: mean and half-width of the 95% "
          "t interval; a cell pools its seeds. Wilcoxon p: two-sided signed-rank test of each cell against the "
          "best one (**bold**), paired over (rater, trial).")


def metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- /]", "_", text)


def log_metrics(client, test: Test, summary: dict) -> list[str]:
    """The metrics of the module docstring on the study's parent run and on each rated run; the warnings."""
    from mlflow.entities import Metric
    stamp, step, warnings = int(time.time() * 1000), summary["ratings"], []

    def metric(name, value):
        return [Metric(metric_name(name), float(value), stamp, step)] if value is not None else []
    parent = test.key.get("study", {}).get("parent_run_id")
    if parent:
        items = metric("listening_raters", len(summary["raters"]))
        items += metric("listening_raters_dropped", len(summary["dropped"])) + metric("listening_ratings", step)
        for cell, s in summary["cells"].items():
            items += metric(f"listening_mean_{cell}", s["mean"]) + metric(f"listening_ci95_{cell}", s["ci95"])
            items += metric(f"listening_wilcoxon_p_{cell}", s["wilcoxon_p"])
        try:
            client.log_batch(parent, metrics=items)
        except Exception as error:  # noqa: BLE001 - the files are the result; MLflow is a copy
            warnings.append(f"listening metrics not logged to the parent run {parent} ({str(error)[:200]})")
    for condition in test.conditions:
        if condition["kind"] != MODEL or not condition["run_id"]:
            continue
        s, own = summary["cells"][condition["cell"]], summary["conditions"][condition["name"]]
        items = metric("listening_mean", s["mean"]) + metric("listening_ci95", s["ci95"])
        items += metric("listening_n", s["n"]) + metric("listening_wilcoxon_p", s["wilcoxon_p"])
        items += metric("listening_seed_mean", own["mean"])
        try:
            client.log_batch(condition["run_id"], metrics=items)
        except Exception as error:  # noqa: BLE001
            warnings.append(f"listening metrics not logged to run {condition['run_id']} ({str(error)[:200]})")
    return warnings


def update_study_report(test: Test, summary: dict) -> Path | None:
    """Rewrite OUT_DIR/report/results.* with the listening figures, from the rows ablate.py saved; the report
    folder, or None when the test is not from a study. StudyError when the study has no saved rows."""
    from music_continuation.ablation.report import write_report
    study = test.key.get("study") or {}
    if not study.get("out_dir"):
        return None
    report_dir = Path(study["out_dir"]) / REPORT_DIR
    try:
        saved = json.loads((report_dir.parent / ROWS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise StudyError(f"{report_dir.parent / ROWS_FILE}: missing or unreadable; run the study's ablate.py command "
                         f"with --report_only once to write it") from None
    listening = dict(summary, test_dir=str(test.folder), runs={c["name"]: c for c in test.conditions})
    write_report(saved["rows"], saved["names"], report_dir, saved["header"], listening=listening)
    return report_dir


def cell_text(summary: dict, cell: str) -> str:
    """A cell's listening figure for the study's table: mean ± CI (n, p against the best)."""
    s = summary["cells"].get(cell)
    if s is None or s["mean"] is None:
        return "-"
    ci = "" if s["ci95"] is None else f" ± {s['ci95']:.1f}"
    p = "best" if cell == summary["best"] else ("p n/a" if s["wilcoxon_p"] is None else f"p={s['wilcoxon_p']:.3g}")
    return f"{fmt(s['mean'])}{ci} (n={s['n']}, {p})"
