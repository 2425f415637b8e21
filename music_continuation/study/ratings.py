"""A listening test's files, its raters' ratings (stored, validated) and their statistics (ITU-R BS.1534 MUSHRA).

A test folder (written by render.py):
    test.json          public: the trials, each with its open reference and its stimuli (opaque file names)
    key.json           private, never served: which condition each stimulus is, the conditions, the study
    raters.json        the raters' names (public)
    .token             private: the per-test token a network server asks for
    audio/<trial>/     the players (lead-in + context + ending, one gain per trial)
    ratings/<rater>.jsonl   private: one JSON line per rating given, appended (the last one of a rater,
                            trial and stimulus counts)

Statistics, over the raters kept by the post-screening:
    post-screening    BS.1534-3: a rater who rates the hidden reference below REFERENCE_FLOOR in more than
                      REFERENCE_SHARE of the trials they rated it in is dropped (and the report says so)
    mean, ci95        per condition and per cell (a cell pools its seeds' conditions), over raters x trials:
                      mean ± t(0.975, n-1) * s / sqrt(n), s the sample standard deviation (n-1)
    wilcoxon_p        paired Wilcoxon signed-rank test (two-sided, scipy.stats.wilcoxon) of each cell
                      against the best cell (highest mean), over the (rater, trial) pairs that rated both;
                      a cell's value in a pair is the mean of its seeds' ratings there. 1 when every
                      difference is zero, None for the best cell itself or without pairs.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

RATING_MIN, RATING_MAX = 0.0, 100.0
REFERENCE_FLOOR = 90.0          # BS.1534-3 post-screening: the hidden reference rated below this ...
REFERENCE_SHARE = 0.15          # ... in more than this share of a rater's trials drops the rater
REFERENCE, ORIGINAL, REPEAT, ANCHOR, MODEL = "reference", "original", "repeat", "anchor", "model"
OTHER_KINDS = (REFERENCE, ORIGINAL, REPEAT, ANCHOR)    # the non-model conditions; their names are their kinds
RATER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
TEST_FILE, KEY_FILE, RATERS_FILE, TOKEN_FILE = "test.json", "key.json", "raters.json", ".token"
RATINGS_DIR, AUDIO_DIR = "ratings", "audio"


class StudyError(Exception):
    """A user error (bad folder, flag, rating or changed test): one line."""


def test_hash(trials: list, stimuli: dict) -> str:
    """The identity of a test: its trials' files and which condition each stimulus is. Ratings record it."""
    text = json.dumps({"trials": trials, "stimuli": stimuli}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: no such file (is {path.parent} a listening test made by "
                         f"`music-continuation-study render`?)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise StudyError(f"{path}: cannot read it ({error})") from None


def write_json(path: Path, data) -> None:
    from music_continuation.utils import atomic_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def check_rater_name(name: str) -> str:
    if not isinstance(name, str) or not RATER_PATTERN.match(name):
        raise StudyError(f"rater name {name!r}: use 1-40 letters, digits, '_', '.' or '-' (starting with a "
                         f"letter or digit)")
    return name


@dataclass
class Test:
    """A rendered test folder: its public part, its key and its raters."""
    folder: Path
    public: dict
    key: dict

    @classmethod
    def load(cls, folder) -> "Test":
        folder = Path(folder)
        if not folder.is_dir():
            raise StudyError(f"{folder}: no such folder")
        public, key = read_json(folder / TEST_FILE), read_json(folder / KEY_FILE)
        if public.get("test_hash") != key.get("test_hash"):
            raise StudyError(f"{folder / KEY_FILE} belongs to another test than {folder / TEST_FILE} "
                             f"(test hash {key.get('test_hash')} != {public.get('test_hash')}); render it again")
        test = cls(folder.resolve(), public, key)
        for trial in public["trials"]:
            for relative in [trial["reference"], *trial["stimuli"].values()]:
                if not (test.folder / relative).is_file():
                    raise StudyError(f"{test.folder / relative}: missing; render the test again")
        return test

    @property
    def hash(self) -> str:
        return self.public["test_hash"]

    @property
    def trial_ids(self) -> list[str]:
        return [trial["id"] for trial in self.public["trials"]]

    def trial(self, trial_id: str) -> dict:
        for trial in self.public["trials"]:
            if trial["id"] == trial_id:
                return trial
        raise StudyError(f"unknown trial {trial_id!r}")

    @property
    def conditions(self) -> list[dict]:
        """[{"name", "kind", "cell", "seed", "checkpoint", "run_id"}] in the order of the report."""
        return self.key["conditions"]

    def condition_of(self, trial_id: str, stimulus: str) -> str:
        try:
            return self.key["stimuli"][trial_id][stimulus]
        except KeyError:
            raise StudyError(f"trial {trial_id!r} has no stimulus {stimulus!r}") from None

    @property
    def raters(self) -> list[str]:
        path = self.folder / RATERS_FILE
        return list(read_json(path)) if path.is_file() else []

    def add_raters(self, names: list[str]) -> list[str]:
        raters = self.raters
        for name in names:
            if check_rater_name(name) not in raters:
                raters.append(name)
        write_json(self.folder / RATERS_FILE, raters)
        return raters


# ------------------------------------------------------------------------------------------- storage

def validate(test: Test, rater, trial_id, stimulus, value) -> dict:
    """The record of one rating, or StudyError: a known rater, trial and stimulus, a number in 0..100."""
    if rater not in test.raters:
        raise StudyError(f"unknown rater {rater!r}")
    if not isinstance(trial_id, str) or trial_id not in test.trial_ids:
        raise StudyError(f"unknown trial {trial_id!r}")
    if not isinstance(stimulus, str):
        raise StudyError(f"trial {trial_id}: stimulus must be a string, got {stimulus!r}")
    condition = test.condition_of(trial_id, stimulus)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not RATING_MIN <= value <= RATING_MAX:
        raise StudyError(f"rating {value!r}: must be a number from {RATING_MIN:g} to {RATING_MAX:g}")
    return {"test_hash": test.hash, "rater": rater, "trial": trial_id, "stimulus": stimulus,
            "condition": condition, "value": float(value), "time": round(time.time(), 3)}


def append_rating(test: Test, record: dict) -> None:
    """Append one record to the rater's file: a line written whole under an exclusive lock, then fsync, so
    two saves at once (threads or processes) both land and a crash leaves at most a torn last line."""
    folder = test.folder / RATINGS_DIR
    folder.mkdir(exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    descriptor = os.open(folder / f"{record['rater']}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)      # releases the lock


def read_ratings(test: Test) -> list[dict]:
    """Every saved record of the test, in file order; StudyError (one line) for ratings of another version of
    the test (its conditions or files changed since they were given). A torn last line is skipped."""
    records = []
    folder = test.folder / RATINGS_DIR
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue          # a save cut short by a crash: that one rating is lost
                raise StudyError(f"{path}:{number}: not a JSON line") from None
            if record.get("test_hash") != test.hash:
                raise StudyError(f"{path}: ratings of another version of this test (test hash "
                                 f"{record.get('test_hash')}, now {test.hash}: its conditions changed); move "
                                 f"{test.folder / RATINGS_DIR} away to start the ratings anew")
            records.append(record)
    return records


def latest(records: list[dict]) -> dict:
    """{(rater, trial, condition): value}: the last rating of each."""
    return {(r["rater"], r["trial"], r["condition"]): r["value"] for r in records}


def rater_state(test: Test, records: list[dict], rater: str) -> dict:
    """{trial: {stimulus: value}} of one rater (what the page shows again when the rater comes back)."""
    state = {}
    for r in records:
        if r["rater"] == rater:
            state.setdefault(r["trial"], {})[r["stimulus"]] = r["value"]
    return state


def rater_done(test: Test, records: list[dict], rater: str) -> bool:
    """Has the rater rated every stimulus of every trial?"""
    state = rater_state(test, records, rater)
    return all(set(state.get(t["id"], {})) >= set(t["stimuli"]) for t in test.public["trials"])


# ---------------------------------------------------------------------------------------- statistics

def post_screening(values: dict) -> tuple[list[str], dict]:
    """(raters kept, {dropped rater: share of their trials with the hidden reference below the floor})."""
    raters = sorted({rater for rater, _, _ in values})
    kept, dropped = [], {}
    for rater in raters:
        scores = [v for (r, _, c), v in values.items() if r == rater and c == REFERENCE]
        share = sum(v < REFERENCE_FLOOR for v in scores) / len(scores) if scores else 0.0
        if share > REFERENCE_SHARE:
            dropped[rater] = share
        else:
            kept.append(rater)
    return kept, dropped


def mean_ci(values: list[float]) -> tuple:
    """(mean, half-width of the 95% t interval) of the values; None where undefined (no value; one value)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    from scipy import stats
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))


def wilcoxon_p(pairs: list[tuple[float, float]]) -> float | None:
    """Two-sided p of the Wilcoxon signed-rank test of the paired values; 1 if all differences are zero."""
    if not pairs:
        return None
    differences = [a - b for a, b in pairs]
    if all(d == 0 for d in differences):
        return 1.0
    from scipy import stats
    return float(stats.wilcoxon([a for a, _ in pairs], [b for _, b in pairs]).pvalue)


def cell_of(condition: dict) -> str:
    """The group a condition counts in: its cell for a model, its kind otherwise."""
    return condition["cell"] if condition["kind"] == MODEL else condition["name"]


def summarise(test: Test, records: list[dict]) -> dict:
    """The statistics of the module docstring:
    {"raters": kept, "dropped": {rater: share}, "ratings": count used, "best": best cell,
     "conditions": {condition: {"mean", "ci95", "n"}},
     "cells": {cell: {"kind", "mean", "ci95", "n", "wilcoxon_p", "pairs", "conditions": [names]}}}."""
    values = latest(records)
    kept, dropped = post_screening(values)
    used = {key: v for key, v in values.items() if key[0] in kept}
    conditions = {}
    for condition in test.conditions:
        scores = [v for (_, _, c), v in used.items() if c == condition["name"]]
        mean, ci = mean_ci(scores)
        conditions[condition["name"]] = {"mean": mean, "ci95": ci, "n": len(scores)}
    groups = {}
    for condition in test.conditions:
        groups.setdefault(cell_of(condition), []).append(condition)
    cells = {}
    per_pair = {}       # {cell: {(rater, trial): mean of its conditions' ratings there}}
    for cell, members in groups.items():
        names = {c["name"] for c in members}
        scores = [v for (_, _, c), v in used.items() if c in names]
        by_pair = {}
        for (rater, trial, c), v in used.items():
            if c in names:
                by_pair.setdefault((rater, trial), []).append(v)
        per_pair[cell] = {pair: sum(vs) / len(vs) for pair, vs in by_pair.items()}
        mean, ci = mean_ci(scores)
        cells[cell] = {"kind": members[0]["kind"], "mean": mean, "ci95": ci, "n": len(scores),
                       "wilcoxon_p": None, "pairs": 0, "conditions": sorted(names)}
    models = [c for c in cells if cells[c]["kind"] == MODEL and cells[c]["mean"] is not None]
    best = max(models, key=lambda c: cells[c]["mean"]) if models else None
    for cell in models:
        if cell == best:
            continue
        shared = sorted(set(per_pair[cell]) & set(per_pair[best]))
        cells[cell]["pairs"] = len(shared)
        cells[cell]["wilcoxon_p"] = wilcoxon_p([(per_pair[cell][p], per_pair[best][p]) for p in shared])
    return {"raters": kept, "dropped": dropped, "ratings": len(used), "best": best, "conditions": conditions,
            "cells": cells}


def fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_p(value) -> str:
    return "-" if value is None else (f"{value:.3g}")


def screening_line(summary: dict) -> str:
    kept, dropped = summary["raters"], summary["dropped"]
    text = f"{len(kept)} rater(s) kept ({', '.join(kept) or 'none'})"
    if dropped:
        text += "; dropped by the BS.1534 post-screening (hidden reference below {:g} in more than {:.0%} of " \
                "their trials): ".format(REFERENCE_FLOOR, REFERENCE_SHARE) + \
                ", ".join(f"{rater} ({share:.0%} of trials)" for rater, share in sorted(dropped.items()))
    return text + "."


def markdown_table(summary: dict) -> list[str]:
    """The ratings table: one row per cell / other condition, mean ± CI, n, p against the best cell."""
    lines = ["| condition | kind | mean | 95% CI | n | Wilcoxon p vs best |", "|---|---|---|---|---|---|"]
    for cell, s in summary["cells"].items():
        name = f"**{cell}**" if cell == summary["best"] else cell
        ci = "n/a" if s["ci95"] is None else f"± {s['ci95']:.1f}"
        p = "best" if cell == summary["best"] else fmt_p(s["wilcoxon_p"])
        lines.append(f"| {name} | {s['kind']} | {fmt(s['mean'])} | {ci} | {s['n']} | {p} |")
    return lines
