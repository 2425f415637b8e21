"""Turn a folder of audio into a cache of EnCodec latents that training opens memory-mapped.

    python prepare_data.py --audio_dir DIR --out_dir CACHE [--encodec_weights pretrained] \
        [--val_fraction 0.1] [--seed 0] [--min_seconds 4] [--device cuda] [--cache_dtype compact] [--shard I/N]
    python prepare_data.py --merge --out_dir CACHE                 # once every --shard I/N has finished
    python prepare_data.py --demo [--out_dir data_cache/demo]      # the built-in synthetic corpus
    python prepare_data.py --verify CACHE                          # check every file, repair damaged tracks

Each track is read (any rate / channel count), mixed to mono, resampled to 24 kHz, trimmed to whole
latent frames and encoded, block by block (BLOCK_FRAMES), so memory does not grow with the track's
length; a track of at most one block is read, resampled and encoded whole. What decodes is stored: a
header's length is only an estimate. Latents, audio and the latents' per-channel moments go to
CACHE/tracks/<id>.{latents,audio,stats}.npy (hidden temporaries, every write checked, then renamed), and each
file's size, modification time and CRC-32 are recorded with the track.

Progress is an append-only journal, CACHE/shards/shard-I-of-N.jsonl (journal.py: one line per file, a track or a
skipped file; a plain run is shard 0/1), so an interrupted run loses at most the tracks in progress and a file
costs one line whatever the folder's size; a re-run resumes (a finished track is recognised by its source's path,
size and modification time, and its files are verified; a skipped file with the same size and mtime is not read
again), deletes the temporaries a killed run left, and picks up new files. `--shard I/N` prepares only the files
whose path hashes to I, so N processes, on any hosts that share CACHE, prepare one cache together. When every
shard has finished, the last one (or `--merge`) writes manifest.json: the tracks split into train/val by track,
per-channel latent statistics over the training split from the unrounded moments, and the skipped files counted
by reason (each one in CACHE/skipped.tsv). Skipped files are one summary line (one line each with --verbose).
`--verify CACHE` reads every file back against its recorded size and CRC-32 and re-encodes damaged tracks.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from music_continuation.codec import (
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
from music_continuation.data.audio_io import AudioLoadError, iter_mono_blocks, open_audio, resampled_length
from music_continuation.data.cache import (
    AUDIO_INT16_SCALE,
    CACHE_DTYPES,
    CACHE_FORMAT_VERSION,
    DEFAULT_CACHE_DTYPE,
    SHARDS_DIR,
    SKIPPED_NAME,
    TRACKS_DIR,
    CacheError,
    audio_to_int16,
    cache_dtype,
    manifest_path,
    pending_shards,
    read_manifest,
    require_complete,
    shard_progress_path,
    track_paths,
    track_stats_path,
)
from music_continuation.data.integrity import VerifiedFiles, crc32_of, file_record, recorded_files, verify_files
from music_continuation.data.journal import (
    JournalError,
    JournalWriter,
    read_journal,
    read_skipped,
    write_journal,
    write_skipped,
)
from music_continuation.utils import (
    TEMPORARY_NAME,
    UserError,
    atomic_path,
    missing_keys,
    one_line,
    run_command,
    warn,
    write_json,
)

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
DEFAULT_MIN_SECONDS = 4.0    # one training example at the default segment: 2 x 150 frames = 2 x 2 s
DEFAULT_VAL_FRACTION = 0.1
STD_FLOOR = 1e-5             # latent std is clamped to this so normalising never divides by ~0
DEMO_CACHE_DIR = Path("data_cache") / "demo"      # relative to the working directory, like --checkpoint_dir
DEMO_SOURCE_DIR_NAME = "audio"
# Latent frames encoded per encoder call (15 s; the audio is read and resampled in blocks of the same length).
# The encoder's activations take ~16 MB per second of audio (measured: 60 s -> +1 GB), so 15 s keeps a
# worker near +0.27 GB over the codec's ~0.6 GB process; codec.encode runs one call (< its 60 s chunk) as a
# single pass, so a track of at most BLOCK_FRAMES is encoded exactly as before, whole.
BLOCK_FRAMES = 1125
FLOAT16_MAX = float(np.finfo(np.float16).max)     # 65504: larger latents cannot be stored compact
MERGE_LOCK = "merge.lock"    # in CACHE/shards: held to start a shard's progress and to merge


class NoUsableAudioError(UserError, ValueError):
    """The audio folder has nothing that can be used (message names the folder)."""


class CacheWriteError(UserError, OSError):
    """Writing into the cache failed (a full disk, a read-only mount, ...): a fault of the run, never of an audio
    file. The message is one line: 'cannot write PATH: reason'."""


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


# ------------------------------------------------------------------------------------------- shards

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


# ------------------------------------------------------------------------------- checked, atomic writes

@contextlib.contextmanager
def writing(path: Path):
    """Report an OSError raised inside as CacheWriteError('cannot write PATH: reason')."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as error:
        raise CacheWriteError(f"cannot write {path}: {error.strerror or one_line(error)}") from None


def _pwrite_all(descriptor: int, data, offset: int) -> None:
    """os.pwrite until every byte of `data` is stored: on a nearly full file system a write can store part of
    its bytes without an error (the next one then raises ENOSPC)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(descriptor, view, offset)
        if written == 0:
            raise OSError(errno.EIO, "a write stored no bytes")
        view, offset = view[written:], offset + written


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with writing(path), atomic_path(path) as tmp_path:
        np.save(tmp_path, np.ascontiguousarray(array))


def write_json_atomic(path: Path, content: dict) -> None:
    with writing(path):
        write_json(path, content)


def write_manifest_atomic(cache_dir: Path, manifest: dict) -> None:
    write_json_atomic(manifest_path(cache_dir), manifest)


@contextlib.contextmanager
def _npy_temporary(path: Path):
    """A descriptor of a hidden temporary that replaces `path` if the block succeeds (utils.atomic_path); an
    OSError of the file's own (creating, syncing, renaming) is CacheWriteError naming `path`."""
    with writing(path), atomic_path(path) as tmp_path:
        descriptor = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            yield descriptor
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _scratch_file(folder: Path, name: Path):
    """A descriptor of a nameless file in `folder` (tempfile.TemporaryFile: gone when closed, or when the
    process dies); `name` is the cache file it is scratch space for, named in errors."""
    with writing(name), tempfile.TemporaryFile(dir=folder) as scratch:
        yield scratch.fileno()


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class GrowingNpy:
    """A C-ordered .npy file of rows [*row_shape] whose number is known only at the end: rows are appended (every
    write checked), can be read back, and finish(rows) keeps the first `rows` and writes that count into the
    header in place (numpy pads every header so that the first axis can grow to 21 digits).

    Written with pwrite, not through a memory map: pages written through a map stay in the writer's resident
    memory, which would then grow with the track's length; written with pwrite they are only the page cache.
    """

    def __init__(self, descriptor: int, dtype: np.dtype, row_shape: tuple[int, ...], name: Path):
        self.descriptor, self.dtype, self.row_shape, self.name = descriptor, np.dtype(dtype), row_shape, name
        self.row_bytes = self.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        self.rows = 0
        header = _npy_header(self.dtype, (0, *row_shape))
        self.data_offset = len(header)
        self._write(header, 0)

    def _write(self, data, offset: int) -> None:
        with writing(self.name):
            _pwrite_all(self.descriptor, data, offset)

    def append(self, values: np.ndarray) -> None:
        """Append values [n, *row_shape], converted to the file's dtype."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._write(values, self.data_offset + self.rows * self.row_bytes)
        self.rows += len(values)

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) as an array [count, *row_shape]."""
        size = count * self.row_bytes
        data = os.pread(self.descriptor, size, self.data_offset + start * self.row_bytes)
        if len(data) != size:
            raise OSError(errno.EIO, f"{self.name}: read {len(data)} of {size} bytes back")
        return np.frombuffer(data, self.dtype).reshape(count, *self.row_shape)

    def finish(self, rows: int) -> None:
        """Keep the first `rows` rows: cut the file after them and write their count into the header."""
        with writing(self.name):
            os.ftruncate(self.descriptor, self.data_offset + rows * self.row_bytes)
        header = _npy_header(self.dtype, (rows, *self.row_shape))
        assert len(header) == self.data_offset, "numpy's header padding did not leave room for the row count"
        self._write(header, 0)
        self.rows = rows


def _write_transposed(frames_major: GrowingNpy, descriptor: int, name: Path) -> None:
    """Write the rows [F, LATENT_DIM] of `frames_major` as the .npy latents [LATENT_DIM, F] into `descriptor`,
    BLOCK_FRAMES frames at a time (each into LATENT_DIM rows of the file), so only one block is in memory."""
    frames, dtype = frames_major.rows, frames_major.dtype
    header = _npy_header(dtype, (LATENT_DIM, frames))
    with writing(name):
        _pwrite_all(descriptor, header, 0)
        for start in range(0, frames, BLOCK_FRAMES):
            block = frames_major.read(start, min(BLOCK_FRAMES, frames - start)).T
            for channel, row in enumerate(np.ascontiguousarray(block)):
                _pwrite_all(descriptor, row, len(header) + (channel * frames + start) * dtype.itemsize)


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


def _track_files(out_dir: Path, track_id: str) -> dict[str, Path]:
    """{kind: path} of a track's files: its latents, audio and moments."""
    latents, audio = track_paths(out_dir, track_id)
    return {"latents": latents, "audio": audio, "stats": track_stats_path(out_dir, track_id)}


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


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


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
            progress: bool = True, cache_dtype: str = DEFAULT_CACHE_DTYPE, shard: tuple[int, int] = (0, 1),
            verbose: bool = False, reencode: frozenset = frozenset()):
    """Encode the usable audio files under audio_dir of `shard` (I, N: those whose track id is I modulo N; a
    plain run is 0 of 1) into the cache out_dir, then merge if every shard has finished. Returns the manifest,
    or None while other shards have still to finish (the last one merges).

    Resumable: tracks already in out_dir (same source path, size and mtime; files verified) are not re-encoded,
    and files skipped before (same size and mtime) are not read again; `reencode` (track ids: what --verify
    found damaged) are encoded again whatever their records say. Skipped files are one summary line on stderr
    (each one with `verbose`), and listed in CACHE/skipped.tsv by the merge.
    Raises CodecLoadError (bad weights or a cache made with another codec), CacheError (a cache made from another
    folder or with another cache_dtype, shards that disagree, this shard running elsewhere), CacheWriteError (the
    cache cannot be written: a fault of the run, which stops), NoUsableAudioError (nothing usable) and
    FileNotFoundError / OSError (a missing or unreadable audio_dir).
    """
    audio_dir = Path(audio_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    _check_arguments(audio_dir, val_fraction, min_seconds, cache_dtype, shard)
    _check_out_dir(out_dir)
    journal_path = shard_progress_path(out_dir, *shard)
    lock = journal_path.with_suffix(".lock")
    with _locked(lock, busy=f"{out_dir}: another process is preparing {journal_path.stem} of this cache "
                            f"(it holds {lock}); wait for it to finish"):
        stale = remove_stale_temporaries(out_dir, shard)
        if stale:
            warn(f"{out_dir}: deleted {stale} temporary files left by an interrupted run")
        device = torch.device(device or default_device())
        workers = workers or default_workers(device)
        files, duplicates = find_files(audio_dir, exclude=out_dir)
        if duplicates:
            warn(f"{audio_dir}: skipped {duplicates} paths leading to a folder or file already found "
                  f"(symbolic links, hard links or link loops); each real file is encoded once")
        codec = load_codec(encodec_weights, device)
        header = _new_manifest(audio_dir, codec_fingerprint(codec), encodec_weights, cache_dtype)
        del header["tracks"], header["skipped_files"]
        relative = {path: path.relative_to(audio_dir).as_posix() for path in files}
        mine = [path for path in files if _is_track_of(track_id_for(relative[path]), shard)]
        header.update(shard=list(shard), duplicates_skipped=duplicates, files_found=len(mine), settings={
            "val_fraction": val_fraction, "seed": seed, "min_seconds": min_seconds, "encodec_weights": encodec_weights})
        previous, previous_skips = _previous_work(out_dir, header)
        done, carried, todo = _done_and_todo(mine, previous, previous_skips, relative, out_dir, cache_dtype,
                                             min_seconds, reencode)
        _remove_stale_arrays(out_dir, previous, {t["id"] for t in done} | {track_id_for(relative[p]) for p in todo})
        with writing(journal_path):
            write_journal(journal_path, header, done, carried)

        def job(path: Path) -> dict:
            return _encode_track(codec, path, relative[path], out_dir, device, min_seconds, cache_dtype)

        started = time.perf_counter()
        with _single_threaded_ops(device), writing(journal_path), JournalWriter(journal_path) as journal:
            encoded, skipped, encoded_seconds = _encode_all(todo, job, relative, journal, out_dir, workers, progress,
                                                            verbose, shard, min_seconds)
            journal.append({"complete": {
                "encoded_tracks": encoded, "encoded_seconds": round(encoded_seconds, 3),
                "wall_seconds": round(time.perf_counter() - started, 3), "device": str(device), "workers": workers}},
                sync=True)
    if carried or skipped:
        _say(skipped_summary(carried + skipped, len(mine), out_dir, min_seconds, merged=shard[1] == 1))
    return merge(out_dir, when_ready=shard[1] > 1)


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


def _check_arguments(audio_dir: Path, val_fraction: float, min_seconds: float, cache_dtype: str,
                     shard: tuple[int, int]) -> None:
    try:
        with os.scandir(audio_dir) as entries:
            next(entries, None)
    except FileNotFoundError:
        raise FileNotFoundError(f"--audio_dir {audio_dir}: no such directory") from None
    except OSError as error:
        raise OSError(f"cannot read {audio_dir}: {error.strerror}") from None
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if min_seconds < 0:
        raise ValueError(f"--min_seconds must be >= 0, got {min_seconds}")
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"--cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
    if not 0 <= shard[0] < shard[1]:
        raise ValueError(f"--shard {shard[0]}/{shard[1]}: needs 0 <= I < N")


def _check_out_dir(out_dir: Path) -> None:
    """Create out_dir (with its tracks/ and shards/ folders) and write a byte there, so that a folder that cannot be
    used is refused with one line before anything runs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CacheWriteError(f"cannot write {out_dir}: not a folder")
    with writing(out_dir):
        for folder in (out_dir / TRACKS_DIR, out_dir / SHARDS_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())


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


def _encode_all(todo: list, job, relative: dict, journal: JournalWriter, out_dir: Path, workers: int,
                progress: bool, verbose: bool, shard: tuple[int, int],
                min_seconds: float) -> tuple[int, list[dict], float]:
    """Encode the `todo` files in `workers` threads, appending each track (or its skip reason) to the shard's
    journal; returns (tracks encoded, skipped entries, seconds of audio encoded). A CacheWriteError (the cache, not
    the file) stops the run."""
    encoded, skipped, encoded_seconds = 0, [], 0.0
    index, count = shard
    # closing(): on Ctrl-C the queued jobs are cancelled at once, not when the generator is collected; the bar is
    # closed on any exit, so that an error line starts a line of its own
    with tqdm(total=len(todo), desc="encoding" if count == 1 else f"shard {index}/{count}", unit="file",
              disable=not progress or not todo, file=sys.stderr) as bar, \
            contextlib.closing(_run_in_threads(todo, job, workers)) as outcomes:
        for path, outcome in outcomes:
            source = relative[path]
            bar.update()
            try:
                track = outcome.result()
            except CacheWriteError:
                raise
            except (AudioLoadError, OSError) as error:
                reason = str(error).removeprefix(f"{path}: ")
                if verbose:
                    warn(f"{path}: {reason}")
                entry = {"source": source, "kind": skip_kind(error), "reason": reason, "min_seconds": min_seconds,
                         **_stamp_or_none(path)}
                skipped.append(entry)
                for stale_file in _track_files(out_dir, track_id_for(source)).values():
                    stale_file.unlink(missing_ok=True)                   # of an earlier version of the file
                journal.append({"skipped": entry})
                continue
            journal.append({"track": track}, sync=True)                  # from here on, a crash keeps this track
            encoded += 1
            encoded_seconds += track["duration"]
            bar.set_postfix_str(source[-40:], refresh=False)
    return encoded, skipped, encoded_seconds


def _stamp_or_none(path: Path) -> dict:
    """The source's size and mtime (None for a file that cannot be stat'ed: a broken link, which is retried)."""
    try:
        return source_stamp(path)
    except OSError:
        return {"source_size": None, "source_mtime_ns": None}


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
    """Read, encode and store one track (runs in a worker thread); AudioLoadError if the file is unusable,
    CacheWriteError if the cache cannot be written.

    The file streams through in blocks (iter_mono_blocks -> _encode_blocks): the audio straight into its .npy
    temporary, the latents, frame by frame, into a nameless scratch file (both lengths are known only when the
    file has decoded to its end), which is then written out as the [LATENT_DIM, F] .npy temporary. Memory stays
    at a few blocks whatever the track's length.
    """
    _check_source(path)
    track_id = track_id_for(source)
    stamp = source_stamp(path)         # before reading: a file changed meanwhile is re-encoded next run
    paths = _track_files(out_dir, track_id)
    with open_audio(path) as handle:
        _check_header_length(handle, min_seconds, path)
        with _npy_temporary(paths["audio"]) as audio_file, \
                _scratch_file(out_dir / TRACKS_DIR, paths["latents"]) as scratch:
            moments, frames = _encode_to(codec, handle, path, paths, audio_file, scratch, device, min_seconds, dtype)
    save_npy_atomic(paths["stats"], moments.as_array())
    return {"id": track_id, "source": source, "duration": frames / FRAME_RATE, "frames": frames,
            "split": None, **stamp, "files": {kind: file_record(file) for kind, file in paths.items()}}


def _encode_to(codec, handle, path: Path, paths: dict, audio_file: int, scratch: int, device: torch.device,
               min_seconds: float, dtype: str) -> tuple[Moments, int]:
    """Stream the open file into the audio temporary and, through the scratch file, the latents temporary;
    (the latents' moments, frames)."""
    latent_dtype, audio_dtype = CACHE_DTYPES[dtype]
    audio = GrowingNpy(audio_file, audio_dtype, (), paths["audio"])
    latents = GrowingNpy(scratch, latent_dtype, (LATENT_DIM,), paths["latents"])
    moments = _encode_blocks(codec, _source_blocks(handle, path), audio, latents, device, path, min_seconds)
    audio.finish(latents.rows * HOP_LENGTH)          # whole frames: drops the last partial frame
    with _npy_temporary(paths["latents"]) as latent_file:
        _write_transposed(latents, latent_file, paths["latents"])
    _check_promised_length(handle, latents.rows, path)
    return moments, latents.rows


def _check_header_length(handle, min_seconds: float, path: Path) -> None:
    """AudioLoadError (too short) from the header alone, for a format whose header length is exact: decoding
    gives no more samples than it states (a truncated file gives fewer)."""
    if getattr(handle, "format", None) not in EXACT_LENGTH_FORMATS:
        return
    _check_length(resampled_length(handle.frames, handle.samplerate), min_seconds, path)


def _source_blocks(handle, path: Path):
    """iter_mono_blocks of the source; an OSError while reading it (a failing disk) is the file's AudioLoadError,
    never mistaken for a write error of the cache."""
    try:
        yield from iter_mono_blocks(handle, BLOCK_FRAMES / FRAME_RATE)
    except OSError as error:
        raise AudioLoadError(f"{path}: cannot read it ({error.strerror or one_line(error)})") from None


def _encode_blocks(codec, blocks, audio_out: GrowingNpy, latents_out: GrowingNpy, device: torch.device, path: Path,
                   min_seconds: float) -> Moments:
    """Append the 24 kHz blocks to audio_out and their latents [F, LATENT_DIM] to latents_out; return the
    latents' moments. AudioLoadError if less than min_seconds (in whole latent frames) decodes.

    The decoded length is the truth: the header's is an estimate. Frames are encoded BLOCK_FRAMES at a time as
    soon as they have decoded, the remainder once the file has ended; each call also gets the
    ENCODER_CONTEXT_FRAMES of audio before its block (their latents dropped), so only about two blocks of audio are
    held at once, and the calls are exactly those of a file whose length was known in advance.
    """
    pending, pending_start = np.zeros(0, np.float32), 0     # 24 kHz audio from sample pending_start on
    decoded, moments = 0, Moments()
    for block in itertools.chain(blocks, [None]):
        ended = block is None
        if not ended:
            audio_out.append(audio_to_int16(block) if audio_out.dtype == np.int16 else block)
            pending = np.concatenate([pending, block])
            decoded += len(block)
        frames = decoded // HOP_LENGTH
        if ended:
            _check_length(decoded, min_seconds, path)
        while frames - latents_out.rows >= (1 if ended else BLOCK_FRAMES):
            first = latents_out.rows
            stop = min(frames, first + BLOCK_FRAMES)
            left = max(0, first - ENCODER_CONTEXT_FRAMES)
            segment = torch.from_numpy(pending[left * HOP_LENGTH - pending_start: stop * HOP_LENGTH - pending_start])
            latents = encode(codec, segment.to(device).view(1, 1, -1))[0, :, first - left:].float().cpu().numpy()
            _check_latents(latents, latents_out.dtype, path)
            moments.add_frames(latents)
            latents_out.append(latents.T)              # frame by frame; rounded to the cache's type here
            drop = max(0, (stop - ENCODER_CONTEXT_FRAMES) * HOP_LENGTH - pending_start)
            pending, pending_start = pending[drop:], pending_start + drop
    return moments


def _check_length(samples: int, min_seconds: float, path: Path) -> None:
    """AudioLoadError if `samples` decoded 24 kHz samples are nothing, or less than min_seconds of whole frames."""
    if samples == 0:
        raise _unusable(SKIP_EMPTY, f"{path}: empty (no audio samples)")
    frames = samples // HOP_LENGTH
    if frames == 0 or frames / FRAME_RATE < min_seconds:
        raise _unusable(SKIP_TOO_SHORT, f"{path}: too short ({frames / FRAME_RATE:.2f} s < --min_seconds "
                                        f"{min_seconds:g}, one training example)")


def _check_promised_length(handle, frames: int, path: Path) -> None:
    """Warn when the header promised at least a block (15 s) more than decoded: probably a truncated file (what
    decoded is stored). Less is ordinary: a compressed file's header length is an estimate."""
    if handle.frames > 0:
        promised = resampled_length(handle.frames, handle.samplerate) // HOP_LENGTH
        if promised - frames >= BLOCK_FRAMES:
            warn(f"{path}: {frames / FRAME_RATE:.2f} s of audio decoded, its header promises "
                  f"{promised / FRAME_RATE:.2f} s (truncated?); stored what decoded")


def _check_latents(latents: np.ndarray, stored_dtype: np.dtype, path: Path) -> None:
    """AudioLoadError if the latents are not finite, or too large for float16 in a compact cache."""
    if not np.isfinite(latents).all():
        raise _unusable(SKIP_NOT_FINITE,
                        f"{path}: the encoder's latents are not finite (are the samples far outside +-1?)")
    peak = float(np.abs(latents).max(initial=0.0))
    if stored_dtype == np.float16 and peak > FLOAT16_MAX:
        raise _unusable(SKIP_NOT_FINITE, f"{path}: latents reach {peak:.3g}, beyond float16's {FLOAT16_MAX:g}; "
                             f"prepare with --cache_dtype float32")


def _remove_stale_arrays(out_dir: Path, previous: dict, keep_ids: set[str]) -> None:
    """Delete the files of this shard's tracks whose source file is gone (they would never be read again);
    `previous` holds only this shard's tracks, so another shard's are never touched."""
    for track in previous.values():
        if track["id"] not in keep_ids:
            for path in _track_files(out_dir, track["id"]).values():
                path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------- merge

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


# --------------------------------------------------------------------------------------------- demo

def prepare_demo(out_dir=DEMO_CACHE_DIR, num_tracks: int | None = None, seconds: float | None = None,
                 seed: int = 0, device=None, val_fraction: float = DEFAULT_VAL_FRACTION,
                 min_seconds: float | None = None, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic demo corpus into out_dir/audio and prepare it with the 'random' codec
    (and the default --cache_dtype)."""
    from music_continuation.data import demo_corpus
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
    warn(f"{out_dir}: the demo cache was {reason}; re-encoding it")
    manifest_path(out_dir).unlink()
    for path in [*(out_dir / TRACKS_DIR).glob("*.npy"), *pending_shards(out_dir)]:
        path.unlink()


# ------------------------------------------------------------------------------------ decoded references

def decode_references(out_dir, segment_frames_list, device) -> None:
    """Decode every segment of a finished cache once per segment length (references.build_references), with the
    codec recorded in its manifest."""
    from music_continuation.codec import FrozenDecoder, check_fingerprint, codec_fingerprint
    from music_continuation.data.cache import read_manifest, require_complete
    from music_continuation.data.references import build_references
    manifest = read_manifest(out_dir)
    require_complete(manifest, out_dir)
    codec = load_codec(manifest["encodec_weights"], device)
    check_fingerprint(manifest["codec_fingerprint"], codec_fingerprint(codec), f"the cache {out_dir}")
    decoder = FrozenDecoder(codec)
    for frames in segment_frames_list:
        build_references(out_dir, manifest, decoder, manifest["codec_fingerprint"], frames, device=device)


# -------------------------------------------------------------------------------------------- verify

def verify(cache_dir, device=None, workers: int | None = None, progress: bool | None = None) -> int:
    """prepare_data.py --verify: read every file of a finished cache back and compare its size and CRC-32 with the
    manifest's record; re-encode the tracks of damaged files from the audio folder the manifest records (what a
    resume does for a track whose files changed), and drop their decoded references. Returns the exit status:
    0 if the cache is intact or was repaired. CacheError if it cannot be read, prepare()'s errors if the repair
    fails (the audio folder is gone, ...)."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    manifest = read_manifest(cache_dir)
    require_complete(manifest, cache_dir)
    files = recorded_files(cache_dir, manifest)
    started = time.perf_counter()
    damaged = verify_files(files, VerifiedFiles(cache_dir), progress, desc="verifying", reread=True)
    size = sum(record["bytes"] for *_, record in files)
    seconds = time.perf_counter() - started
    unrecorded = sum(not track.get("files") for track in manifest["tracks"])
    note = f"; {unrecorded} tracks of an older version have no records to check" if unrecorded else ""
    if not damaged:
        print(f"{cache_dir}: {len(files)} files of {len(manifest['tracks'])} tracks verified ({size / 1e9:.2f} GB in "
              f"{seconds:.1f} s): intact{note}")
        return 0
    for damage in damaged:
        warn(f"damaged: {damage.line()}")
    ids = frozenset(damage.track["id"] for damage in damaged)
    _drop_references(cache_dir, ids)
    settings = manifest["settings"]
    _say(f"re-encoding {len(ids)} track(s) from {manifest['audio_dir']}")
    repaired = prepare(manifest["audio_dir"], cache_dir, encodec_weights=manifest["encodec_weights"],
                       val_fraction=settings["val_fraction"], seed=settings["seed"], device=device,
                       min_seconds=settings["min_seconds"], workers=workers,
                       cache_dtype=cache_dtype(manifest, cache_dir), reencode=ids)
    kept = ids & {track["id"] for track in repaired["tracks"]}
    gone = f"; {len(ids - kept)} whose source is gone or unusable now were dropped" if ids - kept else ""
    print(f"{cache_dir}: {len(damaged)} damaged file(s) of {len(files)}; re-encoded {len(kept)} track(s){gone}")
    return 0


def _drop_references(cache_dir: Path, track_ids: frozenset) -> None:
    """Delete the decoded references of these tracks in the cache (decoded from the damaged latents, maybe): their
    sets are then partial and the next training run decodes the tracks again."""
    for path in (cache_dir / "references").glob("*/*.npy"):
        if path.stem in track_ids:
            with contextlib.suppress(OSError):      # a read-only cache: its references stay as they are
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
    parser.add_argument("--shard", type=parse_shard, default="0/1", metavar="I/N",
                        help="prepare only shard I of N (the files whose path hashes to I); N processes on any hosts "
                             "sharing --out_dir prepare one cache, and the last to finish writes the manifest")
    parser.add_argument("--merge", action="store_true",
                        help="write the manifest from the finished shards of --out_dir (the last shard does it itself)")
    parser.add_argument("--decode_references", type=int, nargs="+", default=None, metavar="SEGMENT_FRAMES",
                        help="also decode every segment of the cache once for training with --target_audio codec at "
                             "these --segment_frames (references.py; the trainer does it itself before its first "
                             "epoch otherwise); alone with --out_dir: for an existing cache")
    parser.add_argument("--verify", metavar="CACHE", default=None,
                        help="read every file of the finished cache CACHE, compare its size and CRC-32 with what was "
                             "recorded when it was written, and re-encode the tracks of damaged files from the audio "
                             "folder recorded in its manifest (takes only --device and --workers)")
    parser.add_argument("--verbose", action="store_true",
                        help="name each skipped file as it is skipped (otherwise one summary line at the end; the "
                             "list is in CACHE/skipped.tsv)")
    parser.add_argument("--demo", action="store_true",
                        help="generate the built-in synthetic corpus and prepare it with --encodec_weights random")
    parser.add_argument("--demo_tracks", type=int, default=None, help="number of demo tracks")
    parser.add_argument("--demo_seconds", type=float, default=None, help="length of each demo track")
    return parser


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    if args.verify:
        defaults = vars(parser.parse_args([]))
        given = [f"--{name}" for name, value in vars(args).items()
                 if name not in ("verify", "device", "workers", "verbose") and value != defaults[name]]
        if given:
            parser.error(f"--verify takes only --device and --workers (the cache recorded its flags), "
                         f"not {' '.join(given)}")
        return
    if args.merge:
        defaults = vars(parser.parse_args([]))
        given = [f"--{name}" for name, value in vars(args).items()
                 if name not in ("merge", "out_dir", "decode_references") and value != defaults[name]]
        if given:
            parser.error(f"--merge takes only --out_dir (the shards recorded their flags), not {' '.join(given)}")
    elif args.demo:
        if args.audio_dir:
            parser.error("--demo generates its own audio; do not pass --audio_dir with it")
        if args.shard != (0, 1):
            parser.error("--demo is prepared in one run; --shard is for --audio_dir")
    elif not args.audio_dir and not args.decode_references:
        parser.error("--audio_dir is required (or pass --demo for the built-in synthetic corpus)")
    for frames in args.decode_references or ():
        if frames < 1:
            parser.error(f"--decode_references {frames}: a segment length in frames must be at least 1")
    if not args.demo and not args.out_dir:
        parser.error("--out_dir is required")


def run(args) -> int:
    started = time.perf_counter()
    out_dir = args.out_dir or DEMO_CACHE_DIR
    try:
        if args.verify:
            return verify(args.verify, device=args.device, workers=args.workers)
        if args.merge:
            manifest = merge(out_dir)
        elif args.decode_references and not args.audio_dir and not args.demo:
            decode_references(out_dir, args.decode_references, args.device)
            return 0
        elif args.demo:
            manifest = prepare_demo(out_dir, num_tracks=args.demo_tracks, seconds=args.demo_seconds, seed=args.seed,
                                    device=args.device, val_fraction=args.val_fraction, workers=args.workers)
        else:
            manifest = prepare(args.audio_dir, out_dir, encodec_weights=args.encodec_weights,
                               val_fraction=args.val_fraction, seed=args.seed, device=args.device,
                               min_seconds=args.min_seconds, workers=args.workers, cache_dtype=args.cache_dtype,
                               shard=args.shard, verbose=args.verbose)
    except KeyboardInterrupt:
        print("interrupted: the tracks finished so far are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    if manifest is None:
        print(f"{out_dir}: shard {args.shard[0]}/{args.shard[1]} finished in {elapsed:.1f} s; the last shard to "
              f"finish writes the manifest (or run --merge once every shard has)")
        return 0
    if args.decode_references:
        decode_references(out_dir, args.decode_references, args.device)
    summary = manifest["split_summary"]
    hours = sum(t["duration"] for t in manifest["tracks"]) / 3600
    print(f"{out_dir}: {len(manifest['tracks'])} tracks ({hours:.2f} h; train {summary['train']['tracks']}, "
          f"val {summary['val']['tracks']}), {sum(manifest['skipped_files'].values())} skipped, codec "
          f"{manifest['codec_fingerprint']}, {elapsed:.1f} s")
    return 0


def main(argv=None) -> int:
    return run_command(build_parser(), check_flags, run, argv,
                       (CodecLoadError, CacheError, NoUsableAudioError, ValueError, OSError))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
