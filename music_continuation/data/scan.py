"""Finding the files of an audio folder and deciding which are usable, before and while they are read: each real
file once (symbolic links, hard links and link loops lead to a duplicate skipped), a stable track id from its
path, its size and modification time, and the reasons a file is skipped (its name, 0 bytes, a header or decoded
length under --min_seconds), counted by kind in one summary line."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from music_continuation.codec import FRAME_RATE, HOP_LENGTH
from music_continuation.data.audio_io import AudioLoadError, resampled_length
from music_continuation.data.cache import SKIPPED_NAME
from music_continuation.utils import UserError, warn

# Files an audio folder holds besides music, skipped by name without being read; every other file is decided
# by its content (audio_io.open_audio), so a track with a wrong extension or none is still found.
NOT_AUDIO_EXTENSIONS = frozenset(
    ".txt .md .nfo .log .cue .lrc .pdf .rtf .doc .docx .htm .html .xml .json .yaml .yml .csv .ini "   # text
    ".m3u .m3u8 .pls .xspf .sfv .md5 .ffp .accurip .db "                                            # lists, sums
    ".jpg .jpeg .png .gif .bmp .webp .tif .tiff .heic .ico .svg "                                    # images
    ".zip .rar .7z .tar .gz .bz2 .xz".split())                                                      # archives
# Why a file was skipped, as the summary line counts them (CACHE/skipped.tsv has each file's own reason).
SKIP_NOT_AUDIO_NAME = "not audio by its name"
SKIP_EMPTY = "empty"
SKIP_TOO_SHORT = "too short"
SKIP_UNREADABLE = "unreadable or not audio"
SKIP_NOT_FINITE = "latents not finite or too large"
# Formats whose header states the exact number of samples (libsndfile's names): a file of these shorter than
# --min_seconds is skipped from its header, without decoding it.
EXACT_LENGTH_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF"})


class NoUsableAudioError(UserError, ValueError):
    """The audio folder has nothing that can be used (message names the folder)."""


def find_files(audio_dir: Path, exclude: Path | None = None) -> tuple[list[Path], int]:
    """Every non-hidden file under audio_dir (sorted walk), minus anything inside `exclude` (the cache
    itself), each real file once; and the number of duplicate paths skipped.

    Symbolic links are followed, but a directory or file reached again (a symlink loop, a link to a folder
    or file of the tree, a hard link) is skipped. Identity is the (st_dev, st_ino) of what a path leads
    to. Paths without symlinks win, so adding a link never renames (and re-encodes) a track; among links,
    the first in walk order wins. Broken links are kept and reported as unreadable like any bad file.
    """
    seen_dirs, seen_files = _real_tree(audio_dir, exclude)      # walked/kept under their real paths anyway
    files, duplicates = [], 0
    for root, dirs, names in os.walk(audio_dir, followlinks=True, onerror=_unreadable_folder):
        root_path = Path(root)
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            path = root_path / name
            if exclude is not None and path.resolve() == exclude:
                continue
            if _first_visit(path, seen_dirs):
                kept.append(name)
            else:
                duplicates += 1
        dirs[:] = kept
        for name in sorted(n for n in names if not n.startswith(".")):
            if _first_visit(root_path / name, seen_files):
                files.append(root_path / name)
            else:
                duplicates += 1
    return files, duplicates


def _real_tree(audio_dir: Path, exclude: Path | None) -> tuple[dict, dict]:
    """{identity: real path} of the directories and files reachable from audio_dir without following links.
    A real path is taken the first time it is met; every other path to the same identity is a duplicate."""
    real_dirs, real_files = {_identity(audio_dir): audio_dir}, {}
    for root, dirs, names in os.walk(audio_dir):
        root_path = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != exclude]
        for name in dirs:           # os.walk lists links to folders here too, without entering them
            if not (root_path / name).is_symlink():
                real_dirs.setdefault(_identity(root_path / name), root_path / name)
        for name in sorted(n for n in names if not n.startswith(".")):
            if not (root_path / name).is_symlink():
                real_files.setdefault(_identity(root_path / name), root_path / name)
    real_dirs.pop(None, None)
    real_files.pop(None, None)
    return real_dirs, real_files


def _unreadable_folder(error: OSError) -> None:
    warn(f"cannot read {error.filename}: {error.strerror}; the files in it are skipped")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()       # follows symlinks: the identity of what the path leads to
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _first_visit(path: Path, seen: dict) -> bool:
    """True (and remembered) if `path` is the path to walk or keep for the directory/file behind it."""
    identity = _identity(path)
    if identity is None:
        return True
    owner = seen.setdefault(identity, path)
    return owner == path


def track_id_for(relative_source: str) -> str:
    """A stable id from the path relative to the audio folder: the same file always gets the same id."""
    return hashlib.sha1(relative_source.encode()).hexdigest()[:16]


def source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def _stamp_or_none(path: Path) -> dict:
    """The source's size and mtime (None for a file that cannot be stat'ed: a broken link, which is retried)."""
    try:
        return source_stamp(path)
    except OSError:
        return {"source_size": None, "source_mtime_ns": None}


def _check_source(path: Path) -> None:
    """AudioLoadError for what is not audio without opening it: a known non-audio extension, or 0 bytes (also
    what a named pipe reports, which opening would block on). The rest is decided by content (open_audio)."""
    if path.suffix.lower() in NOT_AUDIO_EXTENSIONS:
        raise _unusable(SKIP_NOT_AUDIO_NAME, f"{path}: not an audio file (extension {path.suffix!r})")
    if path.stat().st_size == 0:
        raise _unusable(SKIP_EMPTY, f"{path}: empty file (0 bytes)")


def _unusable(kind: str, message: str) -> AudioLoadError:
    """AudioLoadError(message) that counts under `kind` in the skipped files' summary line."""
    error = AudioLoadError(message)
    error.kind = kind
    return error


def skip_kind(error: BaseException) -> str:
    """The kind of reason a file was skipped for (what the summary line counts); audio_io's errors are all
    SKIP_UNREADABLE."""
    return getattr(error, "kind", SKIP_UNREADABLE)


def _check_header_length(handle, min_seconds: float, path: Path) -> None:
    """AudioLoadError (too short) from the header alone, for a format whose header length is exact: decoding
    gives no more samples than it states (a truncated file gives fewer)."""
    if getattr(handle, "format", None) not in EXACT_LENGTH_FORMATS:
        return
    _check_length(resampled_length(handle.frames, handle.samplerate), min_seconds, path)


def _check_length(samples: int, min_seconds: float, path: Path) -> None:
    """AudioLoadError if `samples` decoded 24 kHz samples are nothing, or less than min_seconds of whole frames."""
    if samples == 0:
        raise _unusable(SKIP_EMPTY, f"{path}: empty (no audio samples)")
    frames = samples // HOP_LENGTH
    if frames == 0 or frames / FRAME_RATE < min_seconds:
        raise _unusable(SKIP_TOO_SHORT, f"{path}: too short ({frames / FRAME_RATE:.2f} s < --min_seconds "
                                        f"{min_seconds:g}, one training example)")


def skipped_summary(skipped: list[dict], found: int, out_dir: Path, min_seconds: float, merged: bool) -> str:
    """The one line that counts the skipped files by kind of reason."""
    kinds = count_kinds(skipped)
    parts = ", ".join(f"{count} {kind}" + (f" (< --min_seconds {min_seconds:g})" if kind == SKIP_TOO_SHORT else "")
                      for kind, count in kinds.items())
    where = out_dir / SKIPPED_NAME
    return (f"skipped {len(skipped)} of {found} files: {parts}; each file and why: {where}"
            f"{'' if merged else ' (once every shard has finished)'}; --verbose names each as it is skipped")


def count_kinds(skipped: list[dict]) -> dict[str, int]:
    """{kind: count} of skipped entries, the most frequent first."""
    kinds: dict[str, int] = {}
    for entry in skipped:
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    return dict(sorted(kinds.items(), key=lambda item: (-item[1], item[0])))
