"""What a re-run of prepare_data.py keeps: finished tracks whose source is unchanged and whose files still match
their records, and files skipped before that would be skipped again; the files of tracks whose source is gone
are deleted."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from music_continuation.codec import HOP_LENGTH, LATENT_DIM
from music_continuation.data.cache import CACHE_DTYPES
from music_continuation.data.encode import _track_files
from music_continuation.data.integrity import crc32_of, file_record
from music_continuation.data.scan import SKIP_TOO_SHORT, source_stamp
from music_continuation.utils import one_line, warn


def _done_and_todo(paths: list[Path], previous: dict, previous_skips: dict, relative: dict, out_dir: Path,
                   dtype: str, min_seconds: float, reencode: frozenset) -> tuple[list[dict], list[dict], list[Path]]:
    """(finished tracks whose files verify, skipped files still skipped, paths to encode).

    A file skipped before with the same size and mtime stays skipped without being read (one that was too short
    is read again if --min_seconds is now lower). A finished track whose files do not verify is re-encoded, with
    one warning line naming the file; a track in `reencode` is, silently."""
    done, carried, todo = [], [], []
    for path in paths:
        source = relative[path]
        skip = previous_skips.get(source)
        if skip is not None and _still_skipped(skip, path, min_seconds):
            carried.append(skip)
            continue
        track = previous.get(source)
        if track is None or not _source_unchanged(track, path) or track["duration"] < min_seconds \
                or track["id"] in reencode:
            todo.append(path)
            continue
        problem = _verify(track, out_dir, dtype)
        if problem is None:
            done.append(track)
        else:
            warn(f"{problem}; re-encoding {source}")
            todo.append(path)
    return done, carried, todo


def _still_skipped(skip: dict, path: Path, min_seconds: float) -> bool:
    """True if the file skipped for `skip` would be skipped again: it has the size and mtime it had, and (if it was
    too short) --min_seconds is not lower than it was."""
    if skip.get("source_size") is None or not _source_unchanged(skip, path):
        return False
    if skip["kind"] == SKIP_TOO_SHORT:
        return skip.get("min_seconds") is not None and float(skip["min_seconds"]) <= min_seconds
    return True


def _source_unchanged(track: dict, path: Path) -> bool:
    """True if the source file still has the size and modification time recorded with the track."""
    try:
        return source_stamp(path) == {k: track[k] for k in ("source_size", "source_mtime_ns")}
    except (OSError, KeyError):
        return False


def _verify(track: dict, out_dir: Path, dtype: str) -> str | None:
    """None if a finished track's files can be trusted, else what is wrong with them (one line).

    Every file must have the size recorded when it was written; one modified since (another mtime: copied,
    touched or written to) must also have its recorded CRC-32, and is then trusted at its new mtime. So a resume
    reads back only the files that changed, never the whole cache. A track recorded by a version that kept no
    records is checked by its .npy headers and sizes, and its records are made now.
    """
    records = track.get("files")
    if records is None:
        return _legacy_problem(track, out_dir, dtype)
    paths = _track_files(out_dir, track["id"])
    for kind, record in records.items():
        try:
            stat = paths[kind].stat()
            if stat.st_size != record["bytes"]:
                return f"{paths[kind]}: {stat.st_size} bytes, {record['bytes']} were written"
            if stat.st_mtime_ns != record["mtime_ns"]:
                if crc32_of(paths[kind]) != record["crc32"]:
                    return f"{paths[kind]}: changed since it was written (its CRC-32 differs)"
                record["mtime_ns"] = stat.st_mtime_ns
        except OSError as error:
            return f"{paths[kind]}: {error.strerror}"
    return None


def _legacy_problem(track: dict, out_dir: Path, dtype: str) -> str | None:
    """What is wrong with the files of a track from a version that recorded none: each must be a .npy of the
    track's shape and type holding exactly its bytes (the moments may be missing from a float32 cache: format
    version 1 had none, and float32 latents are unrounded, so they can be recomputed). Records them if intact."""
    paths = _track_files(out_dir, track["id"])
    latent_dtype, audio_dtype = CACHE_DTYPES[dtype]
    expected = {"latents": ((LATENT_DIM, track["frames"]), latent_dtype),
                "audio": ((track["frames"] * HOP_LENGTH,), audio_dtype),
                "stats": ((2, LATENT_DIM), np.dtype(np.float64))}
    if dtype == "float32" and not paths["stats"].exists():
        del expected["stats"]
    for kind, (shape, array_dtype) in expected.items():
        problem = _npy_problem(paths[kind], shape, array_dtype)
        if problem:
            return problem
    track["files"] = {kind: file_record(paths[kind]) for kind in expected}
    return None


def _npy_problem(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """None if `path` is a .npy file of this shape and dtype holding exactly its bytes, else what is wrong."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found = read_header(file)
            size, data_offset = os.fstat(file.fileno()).st_size, file.tell()
    except (OSError, ValueError) as error:
        return f"{path}: not a readable .npy file ({one_line(error)})"
    if found != (shape, False, dtype):
        return f"{path}: holds {found[2]} {found[0]}, the manifest says {dtype} {shape}"
    expected = data_offset + int(np.prod(shape)) * dtype.itemsize
    return None if size == expected else f"{path}: {size} bytes, its {dtype} {shape} array needs {expected}"


def _remove_stale_arrays(out_dir: Path, previous: dict, keep_ids: set[str]) -> None:
    """Delete the files of this shard's tracks whose source file is gone (they would never be read again);
    `previous` holds only this shard's tracks, so another shard's are never touched."""
    for track in previous.values():
        if track["id"] not in keep_ids:
            for path in _track_files(out_dir, track["id"]).values():
                path.unlink(missing_ok=True)
