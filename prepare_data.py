"""Turn a folder of audio into a cache of EnCodec latents that training opens memory-mapped.

    python prepare_data.py --audio_dir DIR --out_dir CACHE [--encodec_weights pretrained] \
        [--val_fraction 0.1] [--seed 0] [--min_seconds 4] [--device cuda] [--cache_dtype compact]
    python prepare_data.py --demo [--out_dir data_cache/demo]      # the built-in synthetic corpus

Each track is read (any rate / channel count), mixed to mono, resampled to 24 kHz, trimmed to whole
latent frames and encoded, block by block (BLOCK_FRAMES), so memory does not grow with the track's
length; a track of at most one block is read, resampled and encoded whole. Latents, audio and the
latents' per-channel moments go to CACHE/tracks/<id>.{latents,audio,stats}.npy (written in place
into hidden temporaries, then renamed) and the manifest is rewritten atomically after every track,
so an interrupted run loses at most the track in progress and a re-run resumes (finished tracks are
recognised by source path, size and modification time), deletes the temporaries a killed run left,
and picks up new files. Once every file is done the tracks are split into train/val by track, and
per-channel latent statistics are computed over the training split from the unrounded moments.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from audio_io import AudioLoadError, iter_mono_blocks, open_audio, resampled_length
from codec import (
    ENCODER_CONTEXT_FRAMES,
    FRAME_RATE,
    HOP_LENGTH,
    LATENT_DIM,
    SAMPLE_RATE,
    WEIGHT_CHOICES_HELP,
    CodecLoadError,
    check_fingerprint,
    codec_fingerprint,
    encode,
    load_codec,
)
from data import (
    AUDIO_INT16_SCALE,
    CACHE_DTYPES,
    CACHE_FORMAT_VERSION,
    DEFAULT_CACHE_DTYPE,
    TRACKS_DIR,
    CacheError,
    audio_to_int16,
    cache_dtype,
    manifest_path,
    read_manifest,
    track_paths,
    track_stats_path,
)
from utils import TEMPORARY_NAME, atomic_path

# Files an audio folder holds besides music, skipped by name without being read; every other file is decided
# by its content (audio_io.open_audio), so a track with a wrong extension or none is still found.
NOT_AUDIO_EXTENSIONS = frozenset(
    ".txt .md .nfo .log .cue .lrc .pdf .rtf .doc .docx .htm .html .xml .json .yaml .yml .csv .ini "   # text
    ".m3u .m3u8 .pls .xspf .sfv .md5 .ffp .accurip .db "                                            # lists, sums
    ".jpg .jpeg .png .gif .bmp .webp .tif .tiff .heic .ico .svg "                                    # images
    ".zip .rar .7z .tar .gz .bz2 .xz".split())                                                      # archives
DEFAULT_MIN_SECONDS = 4.0    # one training example at the default segment: 2 x 150 frames = 2 x 2 s
DEFAULT_VAL_FRACTION = 0.1
STD_FLOOR = 1e-5             # latent std is clamped to this so normalising never divides by ~0
DEMO_CACHE_DIR = Path(__file__).resolve().parent / "data_cache" / "demo"
DEMO_SOURCE_DIR_NAME = "audio"
# Latent frames encoded per encoder call (15 s; the audio is read and resampled in blocks of the same length).
# The encoder's activations take ~16 MB per second of audio (measured: 60 s -> +1 GB), so 15 s keeps a
# worker near +0.27 GB over the codec's ~0.6 GB process; codec.encode runs one call (< its 60 s chunk) as a
# single pass, so a track of at most BLOCK_FRAMES is encoded exactly as before, whole.
BLOCK_FRAMES = 1125
FLOAT16_MAX = float(np.finfo(np.float16).max)     # 65504: larger latents cannot be stored compact


class NoUsableAudioError(ValueError):
    """The audio folder has nothing that can be used (message names the folder)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------- file scan

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
    for root, dirs, names in os.walk(audio_dir, followlinks=True):
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


# ---------------------------------------------------------------------------------------- atomic I/O

def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp_path:
        np.save(tmp_path, np.ascontiguousarray(array))


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the hidden temporaries (manifest, track arrays) that a killed run left in out_dir; return how many.

    A temporary is stale when the process named in it (utils.atomic_path puts its PID there) is no longer
    running; a concurrent run's temporaries are left alone.
    """
    removed = 0
    for folder in (out_dir, out_dir / TRACKS_DIR):
        for path in folder.glob(".*.tmp-*"):
            match = TEMPORARY_NAME.match(path.name)
            if match and not _process_running(int(match.group(1))):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by another user
        return True
    return True


def write_manifest_atomic(cache_dir: Path, manifest: dict) -> None:
    with atomic_path(manifest_path(cache_dir)) as tmp_path:
        tmp_path.write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------------- split & stats

def split_tracks(track_ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign whole tracks to 'train' or 'val', reproducibly from the seed.

    Each track gets a key u = hash(seed, id); the n_val tracks with the smallest keys are validation,
    n_val = round(val_fraction * n) clamped to [1, n - 1] when val_fraction > 0 and n >= 2 (else 0).
    The choice depends only on the ids, not on the order files were found, and adding files to the
    folder moves few existing tracks between the splits.
    """
    count = len(track_ids)
    num_val = 0
    if val_fraction > 0 and count >= 2:
        num_val = min(max(1, round(val_fraction * count)), count - 1)
    ranked = sorted(track_ids, key=lambda tid: hashlib.sha1(f"{seed}:{tid}".encode()).hexdigest())
    val_ids = set(ranked[:num_val])
    return {tid: ("val" if tid in val_ids else "train") for tid in track_ids}


class Moments:
    """Per-channel count, mean and sum of squared deviations (M2) in float64, merged part by part.

    A part's own mean and M2 are computed in two passes; parts merge with Chan et al.'s update
    (M2 = M2_a + M2_b + delta^2 n_a n_b / n), which is as exact as two passes over all the data and
    needs only one part in memory at a time.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, np.zeros(LATENT_DIM), np.zeros(LATENT_DIM)

    def add_frames(self, latents: np.ndarray) -> None:
        """Merge the frames of latents [LATENT_DIM, n]."""
        values = latents.astype(np.float64)
        mean = values.mean(axis=1)
        self.merge(values.shape[1], mean, ((values - mean[:, None]) ** 2).sum(axis=1))

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + count
        if count == 0:
            return
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    def as_array(self) -> np.ndarray:
        return np.stack([self.mean, self.m2])        # the .stats.npy layout: [2, LATENT_DIM]


def latent_statistics(cache_dir: Path, tracks: list[dict]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every frame of `tracks`, in float64:
    mean_c = sum_t x[c,t] / N,  std_c = max(sqrt(sum_t (x[c,t] - mean_c)^2 / N), STD_FLOOR),
    from each track's stored moments of its unrounded latents (.stats.npy); a track without them
    (a float32 cache of format version 1) is read memory-mapped, one at a time.
    Raises CacheError naming the track if a statistic is not finite, so a manifest never holds NaN.
    """
    total = Moments()
    for track in tracks:
        part = _track_moments(cache_dir, track)
        if not (np.isfinite(part.mean).all() and np.isfinite(part.m2).all()):
            raise CacheError(f"{track_paths(cache_dir, track['id'])[0]} ({track.get('source', track['id'])}): "
                             f"its latents are not finite; delete the file and re-run prepare_data.py")
        total.merge(part.count, part.mean, part.m2)
    std = np.maximum(np.sqrt(total.m2 / max(total.count, 1)), STD_FLOOR)
    if not (np.isfinite(total.mean).all() and np.isfinite(std).all()):
        raise CacheError(f"{cache_dir}: the latent statistics overflow float64; the latents are far too large")
    return total.mean.tolist(), std.tolist()


def _track_moments(cache_dir: Path, track: dict) -> Moments:
    moments = Moments()
    latent_path = track_paths(cache_dir, track["id"])[0]
    stats_path = track_stats_path(cache_dir, track["id"])
    if stats_path.is_file():
        mean, m2 = np.load(stats_path)
        moments.merge(int(track["frames"]), mean, m2)
        return moments
    latents = np.load(latent_path, mmap_mode="r")
    if latents.dtype != np.float32:
        raise CacheError(f"{stats_path}: missing, and the {latents.dtype} latents are rounded; "
                         f"delete {latent_path.name} and re-run prepare_data.py to re-encode the track")
    moments.add_frames(latents)
    return moments


# ------------------------------------------------------------------------------------------ prepare

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
        "skipped": [],
        "duplicates_skipped": 0,
        "settings": {},
    }


def _load_existing(out_dir: Path, audio_dir: Path, fingerprint: str, dtype: str) -> dict | None:
    """The manifest of an earlier run into out_dir, after checking it is the same codec, source folder and
    array types; it is upgraded to this format version (version 1 is a float32 cache)."""
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
    manifest.update(format_version=CACHE_FORMAT_VERSION, cache_dtype=dtype)
    return manifest


def _track_files(out_dir: Path, track_id: str, dtype: str) -> tuple[Path, ...]:
    """The files a finished track has: its arrays, and its moments unless the latents are float32
    (a version-1 cache has none; float32 latents are unrounded, so the moments can be recomputed)."""
    files = track_paths(out_dir, track_id)
    return files if dtype == "float32" else (*files, track_stats_path(out_dir, track_id))


def _is_done(track: dict, path: Path, out_dir: Path, dtype: str) -> bool:
    """A track is finished if the source file is unchanged and its files exist."""
    try:
        unchanged = source_stamp(path) == {k: track[k] for k in ("source_size", "source_mtime_ns")}
    except (OSError, KeyError):
        return False
    return unchanged and all(p.is_file() for p in _track_files(out_dir, track["id"], dtype))


def _check_source(path: Path) -> None:
    """AudioLoadError for what is not audio without opening it: a known non-audio extension, or 0 bytes (also
    what a named pipe reports, which opening would block on). The rest is decided by content (open_audio)."""
    if path.suffix.lower() in NOT_AUDIO_EXTENSIONS:
        raise AudioLoadError(f"{path}: not an audio file (extension {path.suffix!r})")
    if path.stat().st_size == 0:
        raise AudioLoadError(f"{path}: empty file (0 bytes)")


def _planned_frames(handle, path: Path, min_seconds: float) -> int:
    """Whole latent frames of the open file at 24 kHz (from its header), or AudioLoadError if too short."""
    if handle.frames <= 0:
        raise AudioLoadError(f"{path}: empty (no audio samples)")
    frames = resampled_length(handle.frames, handle.samplerate) // HOP_LENGTH
    seconds = frames / FRAME_RATE
    if seconds < min_seconds or frames == 0:
        raise AudioLoadError(f"{path}: too short ({seconds:.2f} s < --min_seconds {min_seconds:g}, "
                             f"one training example)")
    return frames


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def default_workers(device: torch.device) -> int:
    """One encoding thread per usable core on CPU; on a GPU two (one reads the next file meanwhile)."""
    return len(os.sched_getaffinity(0)) if device.type == "cpu" else 2


@contextlib.contextmanager
def _single_threaded_ops(device: torch.device):
    """On CPU, each worker thread encodes its own track with single-threaded torch ops.

    The encoder (small convolutions and an LSTM stepping over frames) scales poorly over intra-op
    threads, and intra-op threads spin badly when cores are shared; one track per core does not.
    The caller's setting is restored afterwards.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prepare(audio_dir, out_dir, encodec_weights: str = "pretrained", val_fraction: float = DEFAULT_VAL_FRACTION,
            seed: int = 0, device=None, min_seconds: float = DEFAULT_MIN_SECONDS, workers: int | None = None,
            progress: bool = True, cache_dtype: str = DEFAULT_CACHE_DTYPE) -> dict:
    """Encode every usable audio file under audio_dir into the cache out_dir; return the manifest.

    Resumable: tracks already in out_dir (same source path, size and mtime) are not re-encoded.
    Raises CodecLoadError (bad weights or a cache made with another codec), CacheError (a cache made
    from another folder or with another cache_dtype), NoUsableAudioError (nothing usable) and
    FileNotFoundError (no audio_dir).
    """
    audio_dir = Path(audio_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    _check_arguments(audio_dir, val_fraction, min_seconds, cache_dtype)
    device = torch.device(device or default_device())
    workers = workers or default_workers(device)
    files, duplicates = find_files(audio_dir, exclude=out_dir)
    if duplicates:
        _warn(f"{audio_dir}: skipped {duplicates} paths leading to a folder or file already found "
              f"(symbolic links, hard links or link loops); each real file is encoded once")

    codec = load_codec(encodec_weights, device)
    fingerprint = codec_fingerprint(codec)
    manifest = (_load_existing(out_dir, audio_dir, fingerprint, cache_dtype)
                or _new_manifest(audio_dir, fingerprint, encodec_weights, cache_dtype))
    (out_dir / TRACKS_DIR).mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(out_dir)
    if stale:
        _warn(f"{out_dir}: deleted {stale} temporary files left by an interrupted run")
    manifest["complete"] = False
    manifest["duplicates_skipped"] = duplicates
    manifest["settings"] = {"val_fraction": val_fraction, "seed": seed, "min_seconds": min_seconds,
                            "encodec_weights": encodec_weights}

    previous = {track["source"]: track for track in manifest["tracks"]}
    relative = {path: path.relative_to(audio_dir).as_posix() for path in files}
    done, todo = [], []
    for path in files:
        track = previous.get(relative[path])
        if track is not None and _is_done(track, path, out_dir, cache_dtype) and track["duration"] >= min_seconds:
            done.append(track)
        else:
            todo.append(path)
    _remove_stale_arrays(out_dir, previous, {t["id"] for t in done} | {track_id_for(relative[p]) for p in todo})
    manifest["tracks"] = done
    manifest["skipped"] = []
    write_manifest_atomic(out_dir, manifest)

    def job(path: Path) -> dict:
        return _encode_track(codec, path, relative[path], out_dir, device, min_seconds, cache_dtype)

    started = time.perf_counter()
    with _single_threaded_ops(device):
        encoded_seconds = _encode_all(todo, job, relative, manifest, out_dir, workers, progress)

    if not manifest["tracks"]:
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in manifest["skipped"][:3])
        more = f" (and {len(manifest['skipped']) - 3} more)" if len(manifest["skipped"]) > 3 else ""
        raise NoUsableAudioError(f"--audio_dir {audio_dir}: no usable audio "
                                 f"({len(files)} files found{': ' + reasons + more if reasons else ''})")

    _finish(manifest, out_dir, val_fraction, seed)
    elapsed = time.perf_counter() - started
    manifest["settings"]["last_run"] = {
        "encoded_tracks": len(todo) - len(manifest["skipped"]), "encoded_seconds": round(encoded_seconds, 3),
        "wall_seconds": round(elapsed, 3), "device": str(device), "workers": workers}
    write_manifest_atomic(out_dir, manifest)
    return manifest


def _check_arguments(audio_dir: Path, val_fraction: float, min_seconds: float, cache_dtype: str) -> None:
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"--audio_dir {audio_dir}: no such directory")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if min_seconds < 0:
        raise ValueError(f"--min_seconds must be >= 0, got {min_seconds}")
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"--cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")


def _encode_all(todo: list, job, relative: dict, manifest: dict, out_dir: Path, workers: int,
                progress: bool) -> float:
    """Encode the `todo` files in `workers` threads, adding each track (or its skip reason) to the manifest
    and rewriting it after every file; returns the seconds of audio encoded."""
    encoded_seconds = 0.0
    bar = tqdm(total=len(todo), desc="encoding", unit="track", disable=not progress or not todo, file=sys.stderr)
    # closing(): on Ctrl-C the queued jobs are cancelled at once, not when the generator is collected
    with contextlib.closing(_run_in_threads(todo, job, workers)) as outcomes:
        for path, outcome in outcomes:
            source = relative[path]
            bar.update()
            try:
                track = outcome.result()
            except (AudioLoadError, OSError) as error:
                reason = str(error).removeprefix(f"{path}: ")
                _warn(f"{path}: {reason}")
                manifest["skipped"].append({"source": source, "reason": reason})
                for stale_file in _track_files(out_dir, track_id_for(source), "compact"):   # of an earlier version
                    stale_file.unlink(missing_ok=True)
                write_manifest_atomic(out_dir, manifest)
                continue
            manifest["tracks"].append(track)
            encoded_seconds += track["duration"]
            write_manifest_atomic(out_dir, manifest)     # from here on, a crash keeps this track
            bar.set_postfix_str(source[-40:], refresh=False)
    bar.close()
    return encoded_seconds


def _run_in_threads(items: list, job, workers: int):
    """Yield (item, future) as the jobs finish; jobs that finished together in the order submitted.

    At most `workers` jobs run at once (torch and libsndfile release the GIL, so they use separate
    cores) and only a few more are queued, so memory stays at about `workers` tracks. On an exception
    in the caller (Ctrl-C) queued jobs are cancelled and running ones finish writing their arrays.
    Submission order among finished jobs means that when a job raises (Ctrl-C in a worker), every
    job submitted before it that has finished is handed over (and recorded) first.
    """
    pending = enumerate(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        running = {pool.submit(job, item): (number, item) for number, item in itertools.islice(pending, 2 * workers)}
        try:
            while running:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in sorted(finished, key=lambda done: running[done][0]):
                    yield running.pop(future)[1], future
                    for number, item in itertools.islice(pending, 1):
                        running[pool.submit(job, item)] = (number, item)
        finally:
            for future in running:
                future.cancel()


def _encode_track(codec, path: Path, source: str, out_dir: Path, device: torch.device, min_seconds: float,
                  dtype: str) -> dict:
    """Read, encode and store one track (runs in a worker thread); AudioLoadError if the file is unusable.

    The file streams through in blocks (iter_mono_blocks -> _encode_blocks) straight into the arrays'
    temporary files, so memory stays at a few blocks whatever the track's length.
    """
    _check_source(path)
    track_id = track_id_for(source)
    stamp = source_stamp(path)         # before reading: a file changed meanwhile is re-encoded next run
    with open_audio(path) as handle:
        frames = _planned_frames(handle, path, min_seconds)
        with _track_arrays(out_dir, track_id, frames, dtype) as (latents, audio):
            moments = _encode_blocks(codec, iter_mono_blocks(handle, BLOCK_FRAMES / FRAME_RATE), latents, audio,
                                     device, path)
    save_npy_atomic(track_stats_path(out_dir, track_id), moments.as_array())
    return {"id": track_id, "source": source, "duration": frames / FRAME_RATE, "frames": frames,
            "split": None, **stamp}


@contextlib.contextmanager
def _track_arrays(out_dir: Path, track_id: str, frames: int, dtype: str):
    """Writers of the track's latents [LATENT_DIM, frames] and audio [frames * HOP_LENGTH] .npy files in the
    cache's types; they are hidden temporaries renamed into place only if the block succeeds."""
    latent_dtype, audio_dtype = CACHE_DTYPES[dtype]
    latent_path, audio_path = track_paths(out_dir, track_id)
    with atomic_path(latent_path) as latent_tmp, atomic_path(audio_path) as audio_tmp, \
            NpyWriter(latent_tmp, latent_dtype, (LATENT_DIM, frames)) as latents, \
            NpyWriter(audio_tmp, audio_dtype, (frames * HOP_LENGTH,)) as audio:
        yield latents, audio


class NpyWriter:
    """A C-ordered .npy file of known shape, written in parts through a file descriptor.

    Not a memory map: pages written through a map stay in the writer's resident memory, which would then
    grow with the track's length; written with pwrite they are only the kernel's page cache.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.dtype, self.shape = np.dtype(dtype), shape
        with open(path, "wb") as file:
            np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                        "fortran_order": False, "shape": shape})
            self.offset = file.tell()
            file.truncate(self.offset + int(np.prod(shape)) * self.dtype.itemsize)
        self.descriptor = os.open(path, os.O_WRONLY)

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.descriptor)

    def __len__(self) -> int:
        return self.shape[-1]

    def write(self, start: int, values: np.ndarray) -> None:
        """Store values [..., n] (converted to the file's dtype) at [..., start:start + n] of the last axis."""
        values = np.ascontiguousarray(values, dtype=self.dtype).reshape(-1, values.shape[-1])
        row_bytes = self.shape[-1] * self.dtype.itemsize
        for row, part in enumerate(values):
            os.pwrite(self.descriptor, part.tobytes(), self.offset + row * row_bytes + start * self.dtype.itemsize)


def _encode_blocks(codec, blocks, latents_out: NpyWriter, audio_out: NpyWriter, device: torch.device,
                   path: Path) -> Moments:
    """Store the 24 kHz blocks in audio_out and their latents in latents_out; return the latents' moments.

    Frames are encoded BLOCK_FRAMES at a time, each call also fed the ENCODER_CONTEXT_FRAMES of audio before its
    block (their latents dropped), so only about two blocks of audio are held at once.
    """
    frames = latents_out.shape[1]
    pending, pending_start = np.zeros(0, np.float32), 0     # 24 kHz audio from sample pending_start on
    next_frame, moments = 0, Moments()
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            block = block[: max(0, len(audio_out) - pending_start - len(pending))]   # past the last whole frame
            stored = audio_to_int16(block) if audio_out.dtype == np.int16 else block
            audio_out.write(pending_start + len(pending), stored)
            pending = np.concatenate([pending, block])
        ready = (pending_start + len(pending)) // HOP_LENGTH
        while next_frame < frames and (ready >= min(frames, next_frame + BLOCK_FRAMES)):
            stop = min(frames, next_frame + BLOCK_FRAMES)
            left = max(0, next_frame - ENCODER_CONTEXT_FRAMES)
            segment = torch.from_numpy(pending[left * HOP_LENGTH - pending_start: stop * HOP_LENGTH - pending_start])
            latents = encode(codec, segment.to(device).view(1, 1, -1))[0, :, next_frame - left:].float().cpu().numpy()
            _check_latents(latents, latents_out.dtype, path)
            moments.add_frames(latents)
            latents_out.write(next_frame, latents)              # rounded to the cache's type here
            next_frame = stop
            drop = max(0, (next_frame - ENCODER_CONTEXT_FRAMES) * HOP_LENGTH - pending_start)
            pending, pending_start = pending[drop:], pending_start + drop
    if next_frame < frames:
        raise AudioLoadError(f"{path}: ended after {next_frame / FRAME_RATE:.2f} s of audio, its header "
                             f"promises {frames / FRAME_RATE:.2f} s (truncated?)")
    return moments


def _check_latents(latents: np.ndarray, stored_dtype: np.dtype, path: Path) -> None:
    """AudioLoadError if the latents are not finite, or too large for float16 in a compact cache."""
    if not np.isfinite(latents).all():
        raise AudioLoadError(f"{path}: the encoder's latents are not finite (are the samples far outside +-1?)")
    peak = float(np.abs(latents).max(initial=0.0))
    if stored_dtype == np.float16 and peak > FLOAT16_MAX:
        raise AudioLoadError(f"{path}: latents reach {peak:.3g}, beyond float16's {FLOAT16_MAX:g}; "
                             f"prepare with --cache_dtype float32")


def _remove_stale_arrays(out_dir: Path, previous: dict, keep_ids: set[str]) -> None:
    """Delete the files of tracks whose source file is gone (they would never be read again)."""
    for track in previous.values():
        if track["id"] not in keep_ids:
            for path in _track_files(out_dir, track["id"], "compact"):
                path.unlink(missing_ok=True)


def _finish(manifest: dict, out_dir: Path, val_fraction: float, seed: int) -> None:
    manifest["tracks"].sort(key=lambda track: track["source"])
    splits = split_tracks([track["id"] for track in manifest["tracks"]], val_fraction, seed)
    for track in manifest["tracks"]:
        track["split"] = splits[track["id"]]
    train = [track for track in manifest["tracks"] if track["split"] == "train"]
    manifest["latent_mean"], manifest["latent_std"] = latent_statistics(out_dir, train)
    manifest["split_summary"] = {
        split: {"tracks": sum(t["split"] == split for t in manifest["tracks"]),
                "frames": sum(t["frames"] for t in manifest["tracks"] if t["split"] == split)}
        for split in ("train", "val")}
    manifest["complete"] = True


# --------------------------------------------------------------------------------------------- demo

def prepare_demo(out_dir=DEMO_CACHE_DIR, num_tracks: int | None = None, seconds: float | None = None,
                 seed: int = 0, device=None, val_fraction: float = DEFAULT_VAL_FRACTION,
                 min_seconds: float | None = None, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic demo corpus into out_dir/audio and prepare it with the 'random' codec
    (and the default --cache_dtype)."""
    import demo_corpus
    num_tracks = demo_corpus.DEFAULT_NUM_TRACKS if num_tracks is None else num_tracks
    seconds = demo_corpus.DEFAULT_SECONDS if seconds is None else seconds
    out_dir = Path(out_dir)
    demo_corpus.write_corpus(out_dir / DEMO_SOURCE_DIR_NAME, num_tracks=num_tracks, seconds=seconds, seed=seed)
    if min_seconds is None:
        min_seconds = min(DEFAULT_MIN_SECONDS, seconds)
    _discard_if_stale(out_dir, random_codec_fingerprint())
    return prepare(out_dir / DEMO_SOURCE_DIR_NAME, out_dir, encodec_weights="random", val_fraction=val_fraction,
                   seed=seed, device=device, min_seconds=min_seconds, workers=workers, progress=progress)


def random_codec_fingerprint() -> str:
    return codec_fingerprint(load_codec("random"))


def _discard_if_stale(out_dir: Path, fingerprint: str) -> None:
    """The demo cache is generated, so one encoded by an older version of the random codec, or stored in
    other array types (an older float32 demo cache), is rebuilt (a user's cache is refused instead, by prepare)."""
    try:
        manifest = read_manifest(out_dir)
    except CacheError:
        return
    if manifest["codec_fingerprint"] != fingerprint:
        reason = "encoded by another random codec"
    elif cache_dtype(manifest, out_dir) != DEFAULT_CACHE_DTYPE:
        reason = f"stored as {cache_dtype(manifest, out_dir)}, not {DEFAULT_CACHE_DTYPE}"
    else:
        return
    _warn(f"{out_dir}: the demo cache was {reason}; re-encoding it")
    manifest_path(out_dir).unlink()
    for path in (out_dir / TRACKS_DIR).glob("*.npy"):
        path.unlink()


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio_dir", help="folder searched recursively for audio (WAV, FLAC, OGG, MP3, ...)")
    parser.add_argument("--out_dir", help=f"cache folder (default with --demo: {DEMO_CACHE_DIR})")
    parser.add_argument("--encodec_weights", default="pretrained", help=WEIGHT_CHOICES_HELP)
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="fraction of tracks (whole tracks) held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (and of the demo corpus)")
    parser.add_argument("--min_seconds", type=float, default=DEFAULT_MIN_SECONDS,
                        help="skip tracks shorter than this (one training example: 2 x segment)")
    parser.add_argument("--device", default=default_device(), help="device the encoder runs on")
    parser.add_argument("--cache_dtype", choices=tuple(CACHE_DTYPES), default=DEFAULT_CACHE_DTYPE,
                        help=f"compact: latents float16, audio int16 PCM (x {AUDIO_INT16_SCALE}), half the bytes; "
                             f"float32: both float32")
    parser.add_argument("--workers", type=int, default=None,
                        help="tracks read and encoded in parallel (default: one per core on CPU, 2 on CUDA)")
    parser.add_argument("--demo", action="store_true",
                        help="generate the built-in synthetic corpus and prepare it with --encodec_weights random")
    parser.add_argument("--demo_tracks", type=int, default=None, help="number of demo tracks")
    parser.add_argument("--demo_seconds", type=float, default=None, help="length of each demo track")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and not args.audio_dir:
        parser.error("--audio_dir is required (or pass --demo for the built-in synthetic corpus)")
    if not args.demo and not args.out_dir:
        parser.error("--out_dir is required")
    if args.demo and args.audio_dir:
        parser.error("--demo generates its own audio; do not pass --audio_dir with it")
    started = time.perf_counter()
    try:
        if args.demo:
            manifest = prepare_demo(args.out_dir or DEMO_CACHE_DIR, num_tracks=args.demo_tracks,
                                    seconds=args.demo_seconds, seed=args.seed, device=args.device,
                                    val_fraction=args.val_fraction, workers=args.workers)
            out_dir = args.out_dir or DEMO_CACHE_DIR
        else:
            manifest = prepare(args.audio_dir, args.out_dir, encodec_weights=args.encodec_weights,
                               val_fraction=args.val_fraction, seed=args.seed, device=args.device,
                               min_seconds=args.min_seconds, workers=args.workers, cache_dtype=args.cache_dtype)
            out_dir = args.out_dir
    except (CodecLoadError, CacheError, NoUsableAudioError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = manifest["split_summary"]
    hours = sum(t["duration"] for t in manifest["tracks"]) / 3600
    print(f"{out_dir}: {len(manifest['tracks'])} tracks ({hours:.2f} h; train {summary['train']['tracks']}, "
          f"val {summary['val']['tracks']}), {len(manifest['skipped'])} skipped, codec "
          f"{manifest['codec_fingerprint']}, {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
