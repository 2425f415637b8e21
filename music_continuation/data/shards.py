"""Shards of one cache: which tracks a --shard I/N prepares, the POSIX locks that keep two processes off one shard
and off the merge, the checks that every shard ran with the same flags, and the merge that turns the shards'
journals into manifest.json (tracks, train/val split, statistics, skipped files)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
from pathlib import Path

from music_continuation.codec import FRAME_RATE, HOP_LENGTH, LATENT_DIM, SAMPLE_RATE, check_fingerprint
from music_continuation.data.cache import (
    CACHE_FORMAT_VERSION,
    SHARDS_DIR,
    SKIPPED_NAME,
    TRACKS_DIR,
    CacheError,
    cache_dtype,
    manifest_path,
    pending_shards,
    read_manifest,
    shard_progress_path,
)
from music_continuation.data.journal import JournalError, read_journal, read_skipped, write_journal, write_skipped
from music_continuation.data.scan import NoUsableAudioError, count_kinds, track_id_for
from music_continuation.data.stats import latent_statistics, split_tracks
from music_continuation.data.writes import write_manifest_atomic, writing
from music_continuation.utils import TEMPORARY_NAME, missing_keys

MERGE_LOCK = "merge.lock"    # in CACHE/shards: held to start a shard's progress and to merge


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), 0 <= I < N: the type of --shard."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (shard I of N), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text}: needs 0 <= I < N (I from 0 to N-1, as $SLURM_ARRAY_TASK_ID "
                                         f"counts)")
    return index, count


def shard_of(track_id: str, count: int) -> int:
    """The shard of a track: its id (a hash of its path relative to --audio_dir) modulo the number of shards, so
    it depends on nothing else and adding files moves no existing one."""
    return int(track_id, 16) % count


def _is_track_of(name: str, shard: tuple[int, int]) -> bool:
    """True if `name` is the id of a track of `shard` (False for anything that is not a track id)."""
    try:
        return shard_of(name, shard[1]) == shard[0]
    except ValueError:
        return False


@contextlib.contextmanager
def _locked(path: Path, busy: str | None = None):
    """Hold an exclusive POSIX (fcntl) lock on `path`: wait for it, or, given `busy`, raise CacheError(busy) if
    another process holds it. POSIX locks work between the hosts of a shared file system (NFS; Lustre mounted
    with -o flock) and die with their process, so a killed run leaves no lock behind."""
    with writing(path):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except OSError as error:
            if busy and error.errno in (errno.EACCES, errno.EAGAIN):
                raise CacheError(busy) from None
            raise CacheError(f"cannot lock {path}: {error.strerror} (the cache's file system must support "
                             f"POSIX locks)") from None
        yield
    finally:
        os.close(descriptor)     # releases the lock


def remove_stale_temporaries(out_dir: Path, shard: tuple[int, int]) -> int:
    """Delete the hidden temporaries (utils.atomic_path's) that a killed run of this shard left: those of its own
    tracks and of its journal; return how many. The caller holds the shard's lock, so no live process is
    writing them, on this host or another; another shard's temporaries are never touched."""
    progress = shard_progress_path(out_dir, *shard)
    removed = 0
    for path in [*(out_dir / TRACKS_DIR).glob(".*.tmp-*"), *progress.parent.glob(f".{progress.stem}.tmp-*")]:
        owner = path.name[1:].split(".")[0]          # the track id, or the journal's stem
        if TEMPORARY_NAME.match(path.name) and (owner == progress.stem or _is_track_of(owner, shard)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _new_manifest(audio_dir: Path, fingerprint: str, encodec_weights: str, dtype: str) -> dict:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "cache_dtype": dtype,
        "complete": False,
        "codec_fingerprint": fingerprint,
        "encodec_weights": encodec_weights,
        "sample_rate": SAMPLE_RATE,
        "frame_rate": FRAME_RATE,
        "hop_length": HOP_LENGTH,
        "latent_dim": LATENT_DIM,
        "audio_dir": str(audio_dir),
        "latent_mean": None,
        "latent_std": None,
        "tracks": [],
        "skipped_files": {},          # {kind of reason: count}; each file and why: CACHE/skipped.tsv
        "duplicates_skipped": 0,
        "settings": {},
    }


def _load_existing(out_dir: Path, audio_dir: Path, fingerprint: str, dtype: str) -> dict | None:
    """The manifest of an earlier run into out_dir (its tracks are reused), after checking it is of the same codec,
    source folder and array types (version 1 is a float32 cache)."""
    if not manifest_path(out_dir).exists():
        return None
    manifest = read_manifest(out_dir)
    check_fingerprint(manifest["codec_fingerprint"], fingerprint, f"the cache {out_dir}")
    if manifest.get("audio_dir") != str(audio_dir):
        raise CacheError(f"{manifest_path(out_dir)}: this cache was made from {manifest.get('audio_dir')}, "
                         f"not {audio_dir}; use another --out_dir")
    existing = cache_dtype(manifest, out_dir)
    if existing != dtype:
        raise CacheError(f"{manifest_path(out_dir)}: this cache was made with --cache_dtype {existing}, not "
                         f"{dtype}; pass --cache_dtype {existing} to resume it, or use another --out_dir")
    return manifest


def _previous_work(out_dir: Path, header: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """({source: track}, {source: skipped entry}) of this shard's files that earlier runs recorded: in the manifest
    and CACHE/skipped.tsv (checked to be of this codec, source folder and cache_dtype), and in this shard's own
    journal (a killed run's). Under the merge lock, the other shards' journals are checked to be of the same N and
    flags, and this shard's journal is started (so that shards of another N starting at the same moment are
    refused)."""
    shard = tuple(header["shard"])
    existing = _load_existing(out_dir, Path(header["audio_dir"]), header["codec_fingerprint"], header["cache_dtype"])
    previous = {track["source"]: track for track in (existing or {"tracks": []})["tracks"]
                if _is_track_of(track["id"], shard)}
    skips = {entry["source"]: entry for entry in (read_skipped(out_dir) if existing else [])
             if _is_track_of(track_id_for(entry["source"]), shard)}
    own = shard_progress_path(out_dir, *shard)
    with _locked(out_dir / SHARDS_DIR / MERGE_LOCK):
        for path in pending_shards(out_dir):
            other = _read_progress(path)
            _check_same_run(header, other, path, arrays_only=path == own)
            if path == own:
                previous.update((track["source"], track) for track in other["tracks"])
                skips.update((entry["source"], entry) for entry in other["skipped"])
        with writing(own):
            write_journal(own, header, list(previous.values()), list(skips.values()))
    return previous, skips


def _read_progress(path: Path) -> dict:
    """A shard's journal as one record: its header's fields, its tracks and skipped files, whether it finished, and
    its last run in settings."""
    try:
        journal = read_journal(path)
    except JournalError as error:
        raise CacheError(f"{error}; delete it and re-run its shard") from None
    header = journal["header"]
    if missing_keys(header, ("shard", "settings", "codec_fingerprint", "audio_dir", "cache_dtype")):
        raise CacheError(f"{path}: not a journal of prepare_data.py; delete it and re-run its shard")
    return {**header, "tracks": journal["tracks"], "skipped": journal["skipped"], "complete": journal["complete"],
            "settings": {**header["settings"], "last_run": journal["last_run"]}}


def _run_flags(record: dict, arrays_only: bool) -> dict:
    """The flags every run into one cache shares (arrays_only: those that change the arrays), as recorded."""
    flags = {"--audio_dir": record["audio_dir"], "--encodec_weights (codec fingerprint)": record["codec_fingerprint"],
             "--cache_dtype": record["cache_dtype"]}
    if not arrays_only:
        flags.update({f"--{key}": record["settings"][key] for key in ("val_fraction", "seed", "min_seconds")})
    return flags


def _check_same_run(record: dict, other: dict, path: Path, arrays_only: bool = False) -> None:
    """CacheError unless the journal `other` (at `path`) is of the same number of shards and flags."""
    (index, count), shards = other["shard"], record["shard"][1]
    if count != shards:
        raise CacheError(f"{path}: progress of --shard {index}/{count}, this run is one of {shards} shards; finish "
                         f"those {count} shards (then --merge), or delete {path.parent}/*.json to start over "
                         f"(their unmerged tracks are then re-encoded)")
    ours, theirs = _run_flags(record, arrays_only), _run_flags(other, arrays_only)
    for flag, value in ours.items():
        if theirs[flag] != value:
            raise CacheError(f"{path}: shard {index}/{count} was run with {flag} {theirs[flag]}, this run has "
                             f"{value}; every shard of a cache needs the same flags")


def merge(out_dir, when_ready: bool = False) -> dict | None:
    """Write the manifest from every shard's journal: the tracks (sorted by source), the skipped files (counted by
    kind; each one in CACHE/skipped.tsv), the train/val split and the statistics; then delete the journals, and
    return the manifest. When nothing was usable, the manifest says so (no_usable_audio: training then says why,
    not 'resume') and NoUsableAudioError is raised. CacheError while a shard has not finished, or with
    when_ready (a shard that has just finished) None instead.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if not (out_dir / SHARDS_DIR).is_dir():
        raise CacheError(f"{out_dir}: no shards to merge (no {SHARDS_DIR} folder); is it a cache folder?")
    with _locked(out_dir / SHARDS_DIR / MERGE_LOCK):
        paths = pending_shards(out_dir)
        parts = [_read_progress(path) for path in paths]
        unfinished = _unfinished(out_dir, paths, parts)
        if unfinished:
            if when_ready:
                return None
            raise CacheError(unfinished)
        manifest, skipped = _combined(parts)
        found = sum(part["files_found"] for part in parts)
        if manifest["tracks"]:
            _finish(manifest, out_dir)
        else:
            kinds = ", ".join(f"{count} {kind}" for kind, count in manifest["skipped_files"].items())
            manifest["no_usable_audio"] = f"{found} files found{': ' + kinds if kinds else ''}"
        for stale in [*out_dir.glob(f".{manifest_path(out_dir).stem}.tmp-*"),       # a killed merge's
                      *out_dir.glob(f".{Path(SKIPPED_NAME).stem}.tmp-*")]:
            stale.unlink(missing_ok=True)
        with writing(out_dir / SKIPPED_NAME):
            if skipped:
                write_skipped(out_dir, skipped)
            else:
                (out_dir / SKIPPED_NAME).unlink(missing_ok=True)
        write_manifest_atomic(out_dir, manifest)
        for path in paths:
            path.unlink()
    if not manifest["tracks"]:
        raise NoUsableAudioError(f"--audio_dir {manifest['audio_dir']}: no usable audio "
                                 f"({manifest['no_usable_audio']}; each file and why: {out_dir / SKIPPED_NAME})")
    return manifest


def _unfinished(out_dir: Path, paths: list[Path], parts: list[dict]) -> str | None:
    """Why the shards cannot be merged yet (one line), or None."""
    if not parts:
        return f"{out_dir}: no shard progress to merge in {out_dir / SHARDS_DIR} (already merged?)"
    count = parts[0]["shard"][1]
    for path, part in zip(paths[1:], parts[1:]):
        _check_same_run(parts[0], part, path)
    missing = [f"{index}/{count}" for index in range(count)
               if not any(part["shard"][0] == index and part["complete"] for part in parts)]
    if missing:
        return (f"{out_dir}: --shard {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} not finished; "
                f"run {'it' if len(missing) == 1 else 'them'} with the same flags (the last to finish merges)")
    return None


def _combined(parts: list[dict]) -> tuple[dict, list[dict]]:
    """(the manifest of the shards' journals: their tracks sorted by source, the skipped files counted by kind,
    one last_run; the skipped files sorted by source)."""
    manifest = {key: value for key, value in parts[0].items()
                if key not in ("shard", "files_found", "journal", "skipped")}
    manifest["tracks"] = sorted((t for part in parts for t in part["tracks"]), key=lambda t: t["source"])
    skipped = sorted((s for part in parts for s in part["skipped"]), key=lambda s: s["source"])
    manifest["skipped_files"] = count_kinds(skipped)
    manifest["duplicates_skipped"] = max(part["duplicates_skipped"] for part in parts)
    runs = [part["settings"]["last_run"] for part in parts]
    manifest["settings"] = {**parts[0]["settings"], "last_run": {
        "shards": len(parts), "encoded_tracks": sum(run["encoded_tracks"] for run in runs),
        "encoded_seconds": round(sum(run["encoded_seconds"] for run in runs), 3),
        "wall_seconds": max(run["wall_seconds"] for run in runs), "device": runs[0]["device"],
        "workers": runs[0]["workers"]}}
    manifest["complete"] = False
    return manifest, skipped


def _finish(manifest: dict, out_dir: Path) -> None:
    settings = manifest["settings"]
    splits = split_tracks([track["id"] for track in manifest["tracks"]], settings["val_fraction"], settings["seed"])
    for track in manifest["tracks"]:
        track["split"] = splits[track["id"]]
    train = [track for track in manifest["tracks"] if track["split"] == "train"]
    manifest["latent_mean"], manifest["latent_std"] = latent_statistics(out_dir, train)
    manifest["split_summary"] = {
        split: {"tracks": sum(t["split"] == split for t in manifest["tracks"]),
                "frames": sum(t["frames"] for t in manifest["tracks"] if t["split"] == split)}
        for split in ("train", "val")}
    manifest["complete"] = True
