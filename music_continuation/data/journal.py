"""A preparation's progress as an append-only journal, and the list of skipped files.

    CACHE/shards/shard-I-of-N.jsonl   one JSON object per line: first the run's header (its flags, codec,
                                      shard), then one line per file, {"track": {...}} or {"skipped": {...}},
                                      and {"complete": {...last run...}} once the shard has finished
    CACHE/skipped.tsv                 every skipped file of the merged cache: source, kind of reason, reason,
                                      size, mtime_ns, --min_seconds (written by the merge, read by a resume)

Each file costs one appended line, so preparing N files writes O(N) bytes (a progress file rewritten after
every file wrote O(N^2)). A run is killed between two appends or in the middle of one: a last line without its
newline is ignored on reading, and the next run of the shard starts a fresh journal (written whole, then
renamed) with what the old one held.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from music_continuation.data.cache import SKIPPED_NAME
from music_continuation.utils import atomic_path

JOURNAL_FORMAT = 1
SKIPPED_COLUMNS = ("source", "kind", "reason", "source_size", "source_mtime_ns", "min_seconds")


class JournalError(ValueError):
    """A journal that cannot be read (the message names it)."""


def read_journal(path: Path) -> dict:
    """{"header": ..., "tracks": [...], "skipped": [...], "complete": bool, "last_run": dict | None} of a journal.
    A later line for the same source replaces an earlier one. JournalError if the first line is no header."""
    try:
        text = path.read_bytes()
    except OSError as error:
        raise JournalError(f"{path}: cannot read it ({error.strerror})") from None
    lines = text.split(b"\n")
    if lines and lines[-1]:
        lines = lines[:-1]            # a torn last line: a run killed in the middle of an append
    entries = []
    for number, line in enumerate(lines):
        if not line:
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise JournalError(f"{path}: line {number + 1} is not JSON") from None
    if not entries or "journal" not in entries[0]:
        raise JournalError(f"{path}: no journal header on its first line")
    header = entries[0]
    tracks, skipped, last_run = {}, {}, None
    for entry in entries[1:]:
        if "track" in entry:
            tracks[entry["track"]["source"]] = entry["track"]
            skipped.pop(entry["track"]["source"], None)
        elif "skipped" in entry:
            skipped[entry["skipped"]["source"]] = entry["skipped"]
            tracks.pop(entry["skipped"]["source"], None)
        elif "complete" in entry:
            last_run = entry["complete"]
    return {"header": header, "tracks": list(tracks.values()), "skipped": list(skipped.values()),
            "complete": last_run is not None, "last_run": last_run}


def write_journal(path: Path, header: dict, tracks: list, skipped: list) -> None:
    """A fresh journal holding `header`, then `tracks` and `skipped`, written whole and renamed into place."""
    with atomic_path(path) as temporary, open(temporary, "w") as file:
        file.write(json.dumps({"journal": JOURNAL_FORMAT, **header}) + "\n")
        for track in tracks:
            file.write(json.dumps({"track": track}) + "\n")
        for entry in skipped:
            file.write(json.dumps({"skipped": entry}) + "\n")


class JournalWriter:
    """Appends lines to a journal (O_APPEND: one write per line). `sync` lines are also fsynced: a track
    that took seconds to encode survives a crash of the machine; a skipped file is just looked at again."""

    def __init__(self, path: Path):
        self.path = path
        self.descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)

    def append(self, entry: dict, sync: bool = False) -> None:
        data = memoryview((json.dumps(entry) + "\n").encode())
        while data:
            written = os.write(self.descriptor, data)
            data = data[written:]
        if sync:
            os.fsync(self.descriptor)

    def close(self) -> None:
        os.close(self.descriptor)

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_skipped(cache_dir: Path, skipped: list) -> None:
    """CACHE/skipped.tsv: one row per skipped file (tab-separated, csv quoting for names with tabs or newlines)."""
    with atomic_path(Path(cache_dir) / SKIPPED_NAME) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(SKIPPED_COLUMNS)
        for entry in skipped:
            writer.writerow([entry.get(column, "") for column in SKIPPED_COLUMNS])


def read_skipped(cache_dir: Path) -> list[dict]:
    """The rows of CACHE/skipped.tsv as dicts ([] if there is none)."""
    try:
        file = open(Path(cache_dir) / SKIPPED_NAME, newline="")
    except FileNotFoundError:
        return []
    with file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    for row in rows:
        for column, kind in (("source_size", int), ("source_mtime_ns", int), ("min_seconds", float)):
            row[column] = kind(row[column]) if row.get(column) not in (None, "") else None
    return rows
