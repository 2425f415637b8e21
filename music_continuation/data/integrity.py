"""Checking a prepared cache's files against what was recorded when they were written: size and CRC-32.

The manifest records every file's size, modification time and CRC-32 (of every byte, header included).
Reading a whole cache back costs its size in reads (0.24 GB per hour of audio in the compact cache), so a file
that verified is remembered in a per-user folder (user_cache_dir()/verified), keyed by what identifies its
bytes on this machine: device, inode, size and modification time. A later run reads back only the files that
are new or changed since, so damage is caught before the first training on it, once per machine. Damage that
keeps size and mtime AFTER a file verified is not seen again by this shortcut: `prepare_data.py --verify CACHE`
reads every file regardless.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from music_continuation.data.cache import CacheError, track_paths, track_stats_path

CHECKSUM_CHUNK = 1 << 20     # bytes read at a time to checksum a cache file
VERIFIED_DIR = "verified"
USER_CACHE_ENV = "MUSIC_CONTINUATION_CACHE"     # overrides the per-user cache folder


def user_cache_dir() -> Path:
    """This user's cache folder: $MUSIC_CONTINUATION_CACHE, else $XDG_CACHE_HOME/music_continuation, else
    ~/.cache/music_continuation (what is there can always be deleted: it is rebuilt)."""
    if os.environ.get(USER_CACHE_ENV):
        return Path(os.environ[USER_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "music_continuation"


def crc32_of(path: Path) -> str:
    checksum = 0
    with open(path, "rb") as file:
        while chunk := file.read(CHECKSUM_CHUNK):
            checksum = zlib.crc32(chunk, checksum)
    return f"{checksum:08x}"


def file_record(path: Path) -> dict:
    """What verifies a cache file later: its size, modification time and CRC-32."""
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "crc32": crc32_of(path)}


@dataclass
class Damage:
    """A cache file that does not match its record: the track (manifest entry), the file, what is wrong."""
    track: dict
    path: Path
    reason: str

    def line(self) -> str:
        return f"{self.path} ({self.track.get('source', self.track['id'])}: {self.reason})"


class VerifiedFiles:
    """The files of one cache this user has verified on this machine: {"dev:ino:size:mtime_ns": crc32}, one
    JSON file per cache folder in user_cache_dir()/verified. Unwritable (a read-only home): nothing is
    remembered, and every run verifies again."""

    def __init__(self, cache_dir: Path):
        name = hashlib.sha1(str(Path(cache_dir).resolve()).encode()).hexdigest()[:16]
        self.path = user_cache_dir() / VERIFIED_DIR / f"{name}.json"
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    @staticmethod
    def key(stat: os.stat_result) -> str:
        return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"

    def verified(self, stat: os.stat_result, crc32: str) -> bool:
        return self.entries.get(self.key(stat)) == crc32

    def add(self, stat: os.stat_result, crc32: str) -> None:
        self.entries[self.key(stat)] = crc32
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(self.entries))
            os.replace(temporary, self.path)
        except OSError:
            temporary.unlink(missing_ok=True)       # not remembered: the next run verifies again


def recorded_files(cache_dir: Path, manifest: dict) -> list[tuple[dict, Path, dict]]:
    """(track, path, record) of every file the manifest records (tracks of older versions record none)."""
    files = []
    for track in manifest["tracks"]:
        latents, audio = track_paths(cache_dir, track["id"])
        paths = {"latents": latents, "audio": audio, "stats": track_stats_path(cache_dir, track["id"])}
        for kind, record in (track.get("files") or {}).items():
            files.append((track, paths[kind], record))
    return files


def verify_files(files: list[tuple[dict, Path, dict]], remembered: VerifiedFiles | None = None,
                 progress: bool | None = None, desc: str = "verifying", reread: bool = False) -> list[Damage]:
    """The damaged files among `files` ((track, path, record)): missing, of another size, or whose CRC-32
    differs from the record. With `remembered`, each file that verifies is remembered, and (unless `reread`) a
    file verified before with the same identity is not read again. A progress bar (bytes) on a terminal."""
    damaged, to_read = [], []
    for track, path, record in files:
        try:
            stat = path.stat()
        except OSError as error:
            damaged.append(Damage(track, path, error.strerror or "cannot be read"))
            continue
        if stat.st_size != record["bytes"]:
            damaged.append(Damage(track, path, f"{stat.st_size} bytes, {record['bytes']} were written"))
        elif reread or remembered is None or not remembered.verified(stat, record["crc32"]):
            to_read.append((track, path, record, stat))
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=sum(stat.st_size for *_, stat in to_read), desc=desc, unit="B", unit_scale=True,
              file=sys.stderr, disable=not show or not to_read, leave=False) as bar:
        for track, path, record, stat in to_read:
            try:
                crc = crc32_of(path)
            except OSError as error:
                damaged.append(Damage(track, path, f"cannot be read ({error.strerror})"))
                continue
            bar.update(stat.st_size)
            if crc != record["crc32"]:
                damaged.append(Damage(track, path, "its CRC-32 differs from the one recorded when it was written"))
            elif remembered is not None:
                remembered.add(stat, crc)
    if remembered is not None:
        remembered.save()
    return damaged


def check_cache_files(cache_dir, manifest: dict, progress: bool | None = None) -> None:
    """Before training: every recorded file of the cache has its size and, once per machine (VerifiedFiles), its
    CRC-32. CacheError naming the damaged files and the command that repairs them."""
    damaged = verify_files(recorded_files(Path(cache_dir), manifest), VerifiedFiles(cache_dir), progress,
                           desc="verifying the cache (once per machine)")
    if damaged:
        raise CacheError(damage_line(damaged, cache_dir))


def damage_line(damaged: list[Damage], cache_dir, shown: int = 3) -> str:
    """One line naming the damaged files (the first `shown`) and the repair."""
    named = "; ".join(damage.line() for damage in damaged[:shown])
    more = f"; and {len(damaged) - shown} more" if len(damaged) > shown else ""
    return (f"{len(damaged)} cache file(s) do not match what was written: {named}{more}; repair them with "
            f"`python prepare_data.py --verify {cache_dir}`")
